"""Architecture dataclasses: one ViT (:class:`ViTArch`), and the MCF model around it (:class:`MCFSpec`).

A :class:`ViTArch` describes every ViT of the project the same way: the online/target encoder
(:class:`mcf.models.vit.MaskedViT`), the frozen perceptual teacher (a timm ``VisionTransformer``,
:mod:`mcf.models.teacher`), and the encoder of an exported checkpoint (``mcf.downstream``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class ViTArch:
    """A ViT's shape: the :class:`mcf.models.vit.MaskedViT` / timm ``VisionTransformer`` kwargs."""

    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0

    def to_dict(self) -> dict[str, Any]:
        """The ViT fields only (also of an :class:`MCFSpec`): the ``mcf.arch`` metadata of an export."""
        return {f.name: getattr(self, f.name) for f in fields(ViTArch)}

    def vit(self) -> ViTArch:
        """This architecture as a plain :class:`ViTArch` (an :class:`MCFSpec`'s encoder)."""
        return ViTArch(**self.to_dict())


@dataclass(frozen=True)
class MCFSpec(ViTArch):
    """An MCF model: its encoder (the :class:`ViTArch` fields), the MAE decoder, the contrastive
    projector/predictor widths, and the name of its matching perceptual teacher (``mcf.models.teacher.TEACHERS``)."""

    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    proj_hidden: int = 4096
    proj_dim: int = 256
    teacher: str = "vit_base_patch16"
