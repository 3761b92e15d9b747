"""Safe checkpoint reading and the weight formats mcf understands.

Every file is read with :func:`mcf.serialization.safe_load` (weights-only unpickling with an
explicit allowlist) or safetensors: a checkpoint can never execute code. Formats: MoCo v3
(``state_dict`` with ``module.base_encoder.``), MAE (``model``; the ``args`` Namespace, ``epoch``,
``scaler`` and ``optimizer`` that MAE's ``misc.save_model`` adds are accepted and ignored), timm /
plain state dicts (optionally ``module.``-prefixed), and ``.safetensors``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from mcf.errors import CheckpointError
from mcf.models.pos_embed import interpolate_pos_embed
from mcf.serialization import safe_load

log = logging.getLogger(__name__)


@dataclass
class LoadReport:
    """What a load did: keys loaded, model keys left missing, checkpoint keys unused or ignored."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"loaded {len(self.loaded)}, missing {len(self.missing)}, unexpected {len(self.unexpected)}, "
            f"ignored {len(self.ignored)}"
        )


def read_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint file safely; missing, unreadable or code-carrying files raise CheckpointError."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p), device="cpu")
        except Exception as e:  # noqa: BLE001 - any parse failure is an unreadable file
            raise CheckpointError(f"cannot read safetensors checkpoint {p}: {e}") from None
    obj = safe_load(p)
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {p} holds a {type(obj).__name__}, not a state dict")
    return obj


def strip_prefix(sd: dict, prefix: str) -> dict:
    """The entries of ``sd`` whose key starts with ``prefix``, the prefix removed (the others dropped)."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def vit_state_dict(obj: dict) -> tuple[dict, str]:
    """The bare ViT state dict inside a MoCo v3, MAE, timm or mcf-export checkpoint, and its format."""
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):
        sd = obj["state_dict"]
        for prefix in ("module.base_encoder.", "base_encoder."):
            if any(k.startswith(prefix) for k in sd):
                return strip_prefix(sd, prefix), "mocov3"
        obj = sd
    if "model" in obj and isinstance(obj["model"], dict):
        return _strip_module(obj["model"]), "mae"
    if "module" in obj and isinstance(obj["module"], dict):  # DeepSpeed consolidated
        return _strip_module(obj["module"]), "deepspeed"
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError("no tensors found in the checkpoint (expected MoCo v3, MAE, timm or safetensors weights)")
    return _strip_module(tensors), "timm"


def _strip_module(sd: dict) -> dict:
    if sd and all(k.startswith("module.") for k in sd):
        return strip_prefix(sd, "module.")
    return sd


def load_teacher_weights(teacher: nn.Module, path: str | Path) -> LoadReport:
    """Load a frozen teacher from MoCo v3 / MAE / timm / safetensors; any missing weight is an error."""
    sd, fmt = vit_state_dict(read_checkpoint(path))
    model = teacher.model
    report = LoadReport()
    own = model.state_dict()
    clean = {}
    for k, v in sd.items():
        if k.startswith(("head.", "fc_norm.", "decoder", "mask_token")):
            report.ignored.append(k)
            continue
        if k == "pos_embed" and k in own and v.shape != own[k].shape:
            v = interpolate_pos_embed(v, own[k].shape[1] - 1)
        clean[k] = v
    for k, v in clean.items():
        if k in own and own[k].shape != v.shape:
            raise CheckpointError(
                f"teacher checkpoint {path}: '{k}' has shape {tuple(v.shape)}, the teacher {tuple(own[k].shape)} "
                "(wrong architecture?)"
            )
    result = model.load_state_dict(clean, strict=False)
    report.missing, report.unexpected = list(result.missing_keys), list(result.unexpected_keys)
    report.loaded = [k for k in clean if k in own]
    if report.missing:
        raise CheckpointError(
            f"teacher checkpoint {path} ({fmt}) lacks {len(report.missing)} weights, e.g. {report.missing[:4]}"
        )
    log.info("teacher loaded from %s (%s format): %s", path, fmt, report.summary())
    return report


_DECODER_KEYS = (
    "decoder_embed.", "mask_token", "decoder_pos_embed", "decoder_blocks.", "decoder_norm.", "decoder_pred.",
)


def init_from_mae(online: nn.Module, path: str | Path, decoder: bool = True) -> LoadReport:
    """Initialise the online encoder (and decoder) from an MAE checkpoint, interpolating position
    embeddings to this model's grid ("partially pre-trained decoder" in the paper)."""
    sd, fmt = vit_state_dict(read_checkpoint(path))
    report = LoadReport()
    enc_own, dec_own = online.encoder.state_dict(), online.decoder.state_dict()
    enc, dec = {}, {}
    for k, v in sd.items():
        if k.startswith(_DECODER_KEYS):
            if not decoder:
                report.ignored.append(k)
                continue
            if k == "decoder_pos_embed" and v.shape != dec_own[k].shape:
                v = interpolate_pos_embed(v, dec_own[k].shape[1] - 1)
            dec[k] = v
        elif k.startswith(("head.", "fc_norm.")):
            report.ignored.append(k)
        else:
            if k == "pos_embed" and k in enc_own and v.shape != enc_own[k].shape:
                v = interpolate_pos_embed(v, enc_own[k].shape[1] - 1)
            enc[k] = v
    for target, own, part, prefix in (
        (online.encoder, enc_own, enc, "encoder."),
        (online.decoder, dec_own, dec, "decoder."),
    ):
        if not part:
            continue
        bad = [k for k, v in part.items() if k in own and own[k].shape != v.shape]
        if bad:
            raise CheckpointError(f"MAE checkpoint {path}: shape mismatch for {bad[:4]} (wrong architecture?)")
        result = target.load_state_dict(part, strict=False)
        report.loaded += [prefix + k for k in part if k in own]
        report.missing += [prefix + k for k in result.missing_keys]
        report.unexpected += [prefix + k for k in result.unexpected_keys]
    if not report.loaded:
        raise CheckpointError(f"{path} ({fmt}) holds no encoder or decoder weights of this model")
    log.info("initialised from MAE checkpoint %s: %s", path, report.summary())
    return report
