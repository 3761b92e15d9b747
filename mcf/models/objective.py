"""What MCF optimises: the masking and loss options of :class:`mcf.models.mcf.MCF`, in one dataclass.

:class:`Objective` is built from the config tree (``Objective.from_config(cfg)``: each field names
its key, ``loss.*`` or ``masking.*``) or from keyword arguments (tests, benchmarks). Adding a loss
option is one field here (with its ``config=`` key) plus that key in :mod:`mcf.config`;
``create_model_from_config`` and ``MCF`` pass the object through unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from operator import attrgetter
from typing import Any


def _opt(default: Any, config: str) -> Any:
    """A field whose value comes from the config key ``config`` (``section.key``)."""
    return dataclasses.field(default=default, metadata={"config": config})


@dataclass(frozen=True, kw_only=True)
class Objective:
    """total = perceptual_weight·perceptual + contrastive_weight·contrastive + pixel_weight·pixel.

    Values are validated where the config tree is (:mod:`mcf.config`'s ``LossConfig`` and
    ``MaskingConfig``); the defaults are the config's (the paper's).
    """

    mask_ratio: float = _opt(0.75, "masking.ratio")
    """Fraction of patches removed from the online and target encoders' input."""
    mask_ratio_range: tuple[float, float] | None = _opt(None, "masking.ratio_range")
    """A mask ratio per image drawn uniformly in [min, max]; the encoders pad to ``min``'s length."""
    perceptual_weight: float = _opt(1000.0, "loss.perceptual_weight")
    contrastive_weight: float = _opt(1.0, "loss.contrastive_weight")
    pixel_weight: float = _opt(0.0, "loss.pixel_weight")
    norm_pix: bool = _opt(False, "loss.norm_pix")
    """Pixel loss on per-patch normalised pixels (MAE's ``norm_pix_loss``)."""
    temperature: float = _opt(0.2, "loss.temperature")
    """InfoNCE temperature; the loss is scaled by 2·temperature."""
    perceptual_layers: tuple[int, ...] = _opt((2, 5, 8, 11), "loss.perceptual_layers")
    """Teacher blocks whose token outputs are compared."""
    perceptual_norm: str = _opt("token", "loss.perceptual_norm")
    perceptual_resize: str = _opt("nearest", "loss.perceptual_resize")

    def __post_init__(self) -> None:
        # YAML and keyword callers may give lists: the objective is hashable and compares by value
        object.__setattr__(self, "perceptual_layers", tuple(self.perceptual_layers))
        if self.mask_ratio_range is not None:
            object.__setattr__(self, "mask_ratio_range", tuple(self.mask_ratio_range))

    @property
    def weights(self) -> dict[str, float]:
        """The weight of each term of :class:`mcf.models.mcf.MCFOutput`'s ``losses``."""
        return {"perceptual": self.perceptual_weight, "contrastive": self.contrastive_weight,
                "pixel": self.pixel_weight}

    @property
    def encoder_ratio(self) -> float:
        """The ratio the encoders mask with: with per-image ratios, the range's lower bound (it fixes the
        padded length of the visible sets on the host)."""
        return self.mask_ratio if self.mask_ratio_range is None else self.mask_ratio_range[0]

    @staticmethod
    def config_keys() -> dict[str, str]:
        """``{field name: config key}``, e.g. ``{"mask_ratio": "masking.ratio", ...}``."""
        return {f.name: f.metadata["config"] for f in dataclasses.fields(Objective)}

    @classmethod
    def from_config(cls, cfg: Any) -> Objective:
        """The objective of an :class:`mcf.config.Config` (any object with the ``loss`` and ``masking`` sections)."""
        return cls(**{name: attrgetter(key)(cfg) for name, key in cls.config_keys().items()})
