"""``mcf export``: the online encoder as a timm ``vit_*`` safetensors file.

The file is a bare timm ``VisionTransformer`` state dict (no classifier head) plus metadata:

* ``timm.name``: the timm architecture (``vit_base_patch16_224`` …; models with no registered timm
  name, such as ``mcf_vit_tiny``, use ``vit_base_patch16_224`` with kwargs overriding every size);
* ``timm.kwargs``: JSON of the ``timm.create_model`` kwargs that rebuild the architecture
  (``img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio``) — always written, so a
  non-default resolution or a custom size loads correctly;
* ``mcf.arch``, ``mcf.model``, ``mcf.source``, ``mcf.step``, ``mcf.format``.

Load it with :func:`load_timm`, or by hand::

    meta = safetensors.safe_open(OUT, "pt").metadata()
    timm.create_model(meta["timm.name"], pretrained=True, pretrained_cfg_overlay=dict(file=OUT),
                      num_classes=0, **json.loads(meta["timm.kwargs"]))

Our encoder's ``pos_embed`` is the fixed MAE sin-cos table with a zero class-token slot, added after
the class token is prepended — exactly timm's default ``class_token=True, no_embed_class=False``;
LayerNorm eps is 1e-6 in both; so ``timm_model.forward_features(x)`` equals
``MaskedViT.forward_features(x)`` (tested to ~1e-5).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from mcf.downstream.weights import (
    EXPORT_FORMAT,
    META_ARCH,
    META_FORMAT,
    META_MODEL,
    META_SOURCE,
    META_STEP,
    META_TIMM_KWARGS,
    META_TIMM_NAME,
    EncoderWeights,
    ViTArch,
    load_encoder_weights,
)
from mcf.errors import CheckpointError, UserError
from mcf.fileio import atomic_path

log = logging.getLogger(__name__)

# timm architecture defaults of the registered names, to pick the closest base name
_TIMM_ARCHS = {
    "vit_small_patch16_224": ViTArch(224, 16, 384, 12, 6),
    "vit_base_patch16_224": ViTArch(224, 16, 768, 12, 12),
    "vit_large_patch16_224": ViTArch(224, 16, 1024, 24, 16),
    "vit_huge_patch14_224": ViTArch(224, 14, 1280, 32, 16),
}


def timm_name_and_kwargs(arch: ViTArch, model_name: str | None = None) -> tuple[str, dict]:
    """The timm architecture name and the kwargs that make it exactly ``arch``."""
    from mcf.models.registry import TIMM_NAMES

    name = TIMM_NAMES.get(model_name or "")
    if name is None:
        name = next((n for n, a in _TIMM_ARCHS.items() if (a.embed_dim, a.depth, a.num_heads, a.patch_size) ==
                     (arch.embed_dim, arch.depth, arch.num_heads, arch.patch_size)), "vit_base_patch16_224")
    return name, arch.to_dict()


def _check_target(out: str | Path) -> Path:
    out = Path(out)
    if out.suffix != ".safetensors":
        raise UserError(f"export target must end in .safetensors, got {out.name}")
    if out.is_dir():
        raise UserError(
            f"export target {out} is a directory: name the file to write (e.g. {out / 'encoder.safetensors'})"
        )
    return out


def export_weights(weights: EncoderWeights, out: str | Path, source: str = "") -> Path:
    """Write ``weights`` as a timm safetensors file with the metadata above."""
    from safetensors.torch import save_file

    if weights.state_dict is None:
        raise UserError("nothing to export: the source is 'random'")
    out = _check_target(out)
    sd = dict(weights.state_dict)
    if "pos_embed" not in sd:
        from mcf.models.pos_embed import sincos_2d

        a = weights.arch
        sd["pos_embed"] = sincos_2d(a.embed_dim, a.img_size // a.patch_size, cls_token=True)
    name, kwargs = timm_name_and_kwargs(weights.arch, weights.model_name)
    meta = {
        META_FORMAT: EXPORT_FORMAT,
        META_TIMM_NAME: name,
        META_TIMM_KWARGS: json.dumps(kwargs),
        META_ARCH: json.dumps(weights.arch.to_dict()),
        META_MODEL: weights.model_name or "",
        META_SOURCE: f"{weights.source_format}:{source}",
        META_STEP: "" if weights.step is None else str(weights.step),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:  # safetensors creates 0600 files: atomic_path gives the umask's mode
        save_file({k: v.detach().float().contiguous() for k, v in sd.items()}, str(tmp), metadata=meta)
    return out


def export(source: str | Path, out: str | Path) -> Path:
    """``mcf export SOURCE OUT``: any checkpoint :func:`load_encoder_weights` reads → timm safetensors."""
    _check_target(out)  # before reading a large checkpoint
    weights = load_encoder_weights(source)
    if weights.state_dict is None:
        raise UserError("nothing to export: the source is 'random'")
    path = export_weights(weights, out, str(source))
    log.info(
        "exported %s encoder (%s, %d tensors) from %s to %s", weights.arch, weights.source_format,
        len(weights.state_dict), source, path,
    )
    return path


def read_export_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - any parse failure is an unreadable file
        raise CheckpointError(f"cannot read {path}: {e}") from None


def load_timm(path: str | Path, **kwargs) -> torch.nn.Module:
    """The exported encoder as a timm model (``num_classes=0``), checking every weight was loaded."""
    import timm

    meta = read_export_metadata(path)
    if META_TIMM_NAME not in meta:
        raise CheckpointError(f"{path} has no '{META_TIMM_NAME}' metadata: not an mcf export")
    args = dict(json.loads(meta.get(META_TIMM_KWARGS, "{}")), num_classes=0)
    args.update(kwargs)
    model = timm.create_model(
        meta[META_TIMM_NAME], pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **args
    )
    # timm loads non-strictly when num_classes differs from the pretrained config: check ourselves
    from safetensors.torch import load_file

    sd = load_file(str(path))
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    if missing:
        raise CheckpointError(f"{path} lacks {len(missing)} weights of timm's {meta[META_TIMM_NAME]}: {missing[:4]}")
    return model
