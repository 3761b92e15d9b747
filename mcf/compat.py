"""Checkpoints in the layout of the paper's released code (``models_mcf.py``)."""

from __future__ import annotations

import torch

from mcf.errors import CheckpointError
from mcf.models.loading import LoadReport
from mcf.models.mcf import MCF

# released prefix → mcf prefix (first match wins, so ``online_encoder.fc.`` precedes ``online_encoder.``)
SEED_PREFIXES = (
    ("online_encoder.fc.", "online.projector."),
    ("online_encoder.", "online.encoder."),
    ("target_encoder.fc.", "target.projector."),
    ("target_encoder.", "target.encoder."),
    ("predictor.", "online.predictor."),
    ("decoder_embed.", "online.decoder.decoder_embed."),
    ("mask_token", "online.decoder.mask_token"),
    ("decoder_pos_embed", "online.decoder.decoder_pos_embed"),
    ("decoder_blocks.", "online.decoder.decoder_blocks."),
    ("decoder_norm.", "online.decoder.decoder_norm."),
    ("decoder_pred.", "online.decoder.decoder_pred."),
    ("perceptual_loss.model.", "perceptual.teacher.model."),
)


def seed_key_to_mcf(key: str) -> str | None:
    for old, new in SEED_PREFIXES:
        if key.startswith(old):
            return new + key[len(old):]
    return None


def from_seed_state_dict(model: MCF, state_dict: dict, strict: bool = False) -> LoadReport:
    """Load a checkpoint of the released code (bare, or under a ``model`` key) into ``model``.

    Ignored on purpose: the teacher's classification ``head.*`` and the target projector's BatchNorm
    running statistics (the target normalises with batch statistics, as the released code did).
    With ``strict``, missing model weights (teacher excepted when absent) raise CheckpointError.
    """
    if "model" in state_dict and isinstance(state_dict["model"], dict):
        state_dict = state_dict["model"]
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    own = dict(model.named_parameters())
    own.update(dict(model.named_buffers()))
    report, mapped = LoadReport(), {}
    for key, value in state_dict.items():
        new = seed_key_to_mcf(key)
        if new is None:
            report.unexpected.append(key)
        elif new.startswith("perceptual.teacher.model.head.") or (
            new.startswith("target.projector.") and ("running_" in new or "num_batches" in new)
        ):
            report.ignored.append(key)
        elif new not in own:
            report.unexpected.append(key)
        elif own[new].shape != value.shape:
            raise CheckpointError(
                f"'{key}' has shape {tuple(value.shape)} in the checkpoint, {tuple(own[new].shape)} in the model "
                "(wrong architecture?)"
            )
        else:
            mapped[new] = value
    with torch.no_grad():
        for name, value in mapped.items():
            own[name].copy_(value.to(own[name].dtype))
    report.loaded = sorted(mapped)
    has_teacher = any(k.startswith("perceptual.teacher.") for k in mapped)
    report.missing = sorted(
        k
        for k in own
        if k not in mapped
        and not k.endswith("num_batches_tracked")
        and (has_teacher or not k.startswith("perceptual.teacher."))
    )
    if strict and report.missing:
        raise CheckpointError(f"released checkpoint lacks {len(report.missing)} weights, e.g. {report.missing[:4]}")
    return report
