"""Encoder weights from anything a user may hold: an mcf run or step directory, a consolidated fp32
file, an ``mcf export`` safetensors file, the paper's released checkpoint, or ``random``.

Every source is reduced to :class:`EncoderWeights`: a bare ViT state dict with timm's parameter
names (``patch_embed.proj.*``, ``cls_token``, ``pos_embed``, ``blocks.i.*``, ``norm.*``) and the
architecture (:class:`ViTArch`) needed to rebuild it. All reads go through
:func:`mcf.models.loading.read_checkpoint` (weights-only / safetensors: no code is ever executed).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mcf.errors import CheckpointError
from mcf.models.arch import ViTArch
from mcf.models.loading import strip_prefix

log = logging.getLogger(__name__)

# metadata keys of an ``mcf export`` file (safetensors metadata is str -> str)
META_FORMAT = "mcf.format"
META_ARCH = "mcf.arch"
META_TIMM_NAME = "timm.name"
META_TIMM_KWARGS = "timm.kwargs"
META_SOURCE = "mcf.source"
META_STEP = "mcf.step"
META_MODEL = "mcf.model"
EXPORT_FORMAT = "mcf-timm-vit/1"


@dataclass
class EncoderWeights:
    """A bare encoder state dict (timm names) plus its architecture and provenance.

    ``state_dict`` is None for ``random`` (a fresh MAE-initialised encoder is wanted).
    """

    state_dict: dict[str, torch.Tensor] | None
    arch: ViTArch
    source_format: str  # random | export | consolidated | run | paper | timm
    model_name: str | None = None  # registered mcf model, when known
    step: int | None = None


def arch_from_spec(spec: ViTArch) -> ViTArch:
    """The encoder of an :class:`mcf.models.MCFSpec` (or any :class:`ViTArch`)."""
    return spec.vit()


def arch_from_config(config: dict | None) -> tuple[ViTArch, str] | None:
    """The encoder architecture of a saved run config (``{'model': {'name': ..., 'img_size': ...}}``)."""
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict) or not config["model"].get("name"):
        return None
    from mcf.models.registry import get_spec

    name = config["model"]["name"]
    try:
        spec = get_spec(name, img_size=config["model"].get("img_size"))
    except Exception as e:  # noqa: BLE001 - an unknown model name in an old run: fall back to the shapes
        log.warning(
            "checkpoint config names model %r, which cannot be rebuilt (%s): "
            "inferring the architecture from the weights",
            name,
            e,
        )
        return None
    return arch_from_spec(spec), name


def infer_arch(sd: dict[str, torch.Tensor], hint: ViTArch | None = None) -> ViTArch:
    """The architecture of a bare ViT state dict, from tensor shapes.

    Head count is not in the shapes: it comes from ``hint`` when its width matches, else from the
    registered mcf model of the same width, depth and patch, else ``embed_dim // 64`` (timm's ViTs).
    """
    try:
        w = sd["patch_embed.proj.weight"]  # (D, 3, p, p)
    except KeyError:
        raise CheckpointError(
            "no 'patch_embed.proj.weight' in the encoder weights: not a ViT checkpoint of a known layout"
        ) from None
    embed_dim, patch_size = int(w.shape[0]), int(w.shape[-1])
    depth = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    if depth == 0:
        raise CheckpointError("the encoder weights have no transformer blocks ('blocks.N.*')")
    mlp_ratio = float(sd["blocks.0.mlp.fc1.weight"].shape[0]) / embed_dim
    if "pos_embed" in sd:
        grid = int(round((sd["pos_embed"].shape[1] - 1) ** 0.5))
        img_size = grid * patch_size
    else:  # the sin-cos table is a buffer some exporters drop; the resolution then comes from elsewhere
        img_size = hint.img_size if hint else 224
    if hint is not None and hint.embed_dim == embed_dim:
        num_heads = hint.num_heads
    else:
        from mcf.models.registry import MODELS

        same = [s for s in MODELS.values() if (s.embed_dim, s.depth, s.patch_size) == (embed_dim, depth, patch_size)]
        same = same or [s for s in MODELS.values() if (s.embed_dim, s.patch_size) == (embed_dim, patch_size)]
        num_heads = same[0].num_heads if same else max(1, embed_dim // 64)
    return ViTArch(
        img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
        mlp_ratio=mlp_ratio,
    )


def _clean_encoder(sd: dict) -> dict[str, torch.Tensor]:
    """Keep the ViT tensors (drop heads, decoders, MAE's mask token), fp32 and contiguous."""
    drop = ("head.", "fc.", "fc_norm.", "decoder", "mask_token")
    return {k: v.detach().float().contiguous() for k, v in sd.items()
            if isinstance(k, str) and isinstance(v, torch.Tensor) and not k.startswith(drop)}


def from_consolidated(obj: dict, fmt: str) -> EncoderWeights:
    """``{'online': {encoder.*, ...}, 'config': {...}, 'step': N}`` (the trainer's consolidated state)."""
    online = obj["online"]
    sd = _clean_encoder(strip_prefix(online, "encoder."))
    if not sd:
        raise CheckpointError("the checkpoint's 'online' state has no 'encoder.*' weights")
    from_cfg = arch_from_config(obj.get("config"))
    hint, name = from_cfg if from_cfg else (None, None)
    arch = infer_arch(sd, hint)
    step = obj.get("step")
    return EncoderWeights(sd, arch, fmt, name, int(step) if step is not None else None)


def is_paper_layout(obj: dict) -> bool:
    """Does ``obj`` (bare, or under ``model``; keys maybe ``module.``-prefixed) hold ``online_encoder.*``?"""
    sd = obj["model"] if isinstance(obj.get("model"), dict) else obj
    return any(k.removeprefix("module.").startswith("online_encoder.") for k in sd)


def from_paper(obj: dict) -> EncoderWeights:
    """The released code's checkpoint: ``online_encoder.*`` (bare, under ``model``, maybe ``module.``).

    ``online_encoder.fc.*`` is the projector (not part of the ViT) and is dropped, as are the target
    encoder, decoder, predictor and the teacher. The mapping is the one of
    :func:`mcf.compat.seed_key_to_mcf` (``online_encoder.`` → ``online.encoder.``).
    """
    from mcf.compat import seed_key_to_mcf

    sd = obj["model"] if isinstance(obj.get("model"), dict) else obj
    if sd and all(k.startswith("module.") for k in sd):
        sd = strip_prefix(sd, "module.")
    enc = {}
    for k, v in sd.items():
        new = seed_key_to_mcf(k)
        if new is not None and new.startswith("online.encoder."):
            enc[new[len("online.encoder."):]] = v
    enc = _clean_encoder(enc)
    return EncoderWeights(enc, infer_arch(enc), "paper")


def from_export(path: Path) -> EncoderWeights:
    from safetensors import safe_open

    from mcf.models.loading import read_checkpoint

    sd = read_checkpoint(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - already readable above; a broken header here is the same error
        raise CheckpointError(f"cannot read the metadata of {path}: {e}") from None
    hint = ViTArch(**json.loads(meta[META_ARCH])) if META_ARCH in meta else None
    step = int(meta[META_STEP]) if meta.get(META_STEP, "").isdigit() else None
    fmt = "export" if meta.get(META_FORMAT) == EXPORT_FORMAT else "timm"
    sd = _clean_encoder(sd)
    return EncoderWeights(sd, infer_arch(sd, hint), fmt, meta.get(META_MODEL) or None, step)


def check_shapes(weights: EncoderWeights, source: Any) -> EncoderWeights:
    """Every tensor of ``weights`` has the shape its architecture gives it (a ViT built on the meta
    device: no memory, no init); a file with a wrong-shaped tensor is one line naming it, never a
    silent export or a loader's traceback. Unknown names are left to the loader's strict check."""
    from mcf.models.vit import MaskedViT

    a = weights.arch
    with torch.device("meta"):
        want = MaskedViT(a.img_size, a.patch_size, 3, a.embed_dim, a.depth, a.num_heads, a.mlp_ratio).state_dict()
    for name, t in (weights.state_dict or {}).items():
        if name in want and tuple(t.shape) != tuple(want[name].shape):
            raise CheckpointError(f"{source}: tensor {name} has shape {list(t.shape)}, a ViT of {a} needs "
                                  f"{list(want[name].shape)}: the file is damaged or was edited")
    return weights


def load_encoder_weights(source: str | Path, *, random_arch: ViTArch | None = None) -> EncoderWeights:
    """Resolve ``source`` to encoder weights, every tensor's shape checked (:func:`check_shapes`); see
    :func:`_load_encoder_weights`."""
    weights = _load_encoder_weights(source, random_arch=random_arch)
    return weights if weights.state_dict is None else check_shapes(weights, source)


def _load_encoder_weights(source: str | Path, *, random_arch: ViTArch | None = None) -> EncoderWeights:
    """Resolve ``source`` to encoder weights.

    Args:
        source: ``random``; a run directory or ``checkpoints/step_N`` directory (needs the trainer's
            :func:`mcf.train.checkpoint.load_consolidated`); a consolidated ``.pt`` (``online`` key);
            an ``mcf export`` / timm ``.safetensors``; the paper's released ``.pth``; a timm/MAE
            ``.pth`` of a bare ViT.
        random_arch: the architecture of ``random`` (default: the tiny model's).

    Raises:
        CheckpointError: missing, unreadable or unknown checkpoint.
    """
    if str(source) == "random":
        if random_arch is None:
            from mcf.models.registry import get_spec

            return EncoderWeights(None, arch_from_spec(get_spec("mcf_vit_tiny")), "random", "mcf_vit_tiny")
        return EncoderWeights(None, random_arch, "random")
    path = Path(source).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        try:
            from mcf.train.checkpoint import load_consolidated
        except ImportError:
            raise CheckpointError(
                f"{path} is a directory, and reading run/step directories needs mcf.train.checkpoint, which is not "
                "installed"
            ) from None
        return from_consolidated(load_consolidated(path), "run")
    if path.suffix == ".safetensors":
        return from_export(path)
    from mcf.models.loading import read_checkpoint, vit_state_dict

    obj = read_checkpoint(path)
    if isinstance(obj.get("online"), dict):
        return from_consolidated(obj, "consolidated")
    if is_paper_layout(obj):
        return from_paper(obj)
    sd, fmt = vit_state_dict(obj)
    sd = _clean_encoder(sd)
    return EncoderWeights(sd, infer_arch(sd), fmt)


def build_encoder(weights: EncoderWeights, img_size: int | None = None, attn_backend: str = "auto"):
    """A :class:`mcf.models.vit.MaskedViT` holding ``weights`` (fresh MAE init for ``random``).

    ``img_size`` other than the checkpoint's rebuilds the fixed sin-cos position table for the new
    grid (the same function, so nothing learned is lost).
    """
    from mcf.models.vit import MaskedViT

    a = weights.arch
    enc = MaskedViT(
        img_size or a.img_size, a.patch_size, 3, a.embed_dim, a.depth, a.num_heads, a.mlp_ratio,
        attn_backend=attn_backend,
    )
    if weights.state_dict is None:
        return enc
    sd = dict(weights.state_dict)
    if "pos_embed" in sd and sd["pos_embed"].shape != enc.pos_embed.shape:
        del sd["pos_embed"]  # fixed sin-cos: the fresh buffer for the new grid is the same function
    sd.setdefault("pos_embed", enc.pos_embed)
    result = enc.load_state_dict(sd, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"encoder weights do not fit the ViT: missing {result.missing_keys[:4]}, unexpected "
            f"{result.unexpected_keys[:4]}"
        )
    return enc
