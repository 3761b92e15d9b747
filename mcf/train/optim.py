"""AdamW with MAE's parameter groups, and the per-step learning-rate and EMA-momentum schedules."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn as nn

from mcf.config import Config, MomentumConfig, OptimConfig
from mcf.errors import ConfigError

# Parameter names (substrings) that never get weight decay, besides every 1-D parameter
# (biases, LayerNorm/BatchNorm weights).
NO_DECAY_NAMES = ("cls_token", "mask_token", "pos_embed", "dist_token", "reg_token")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups, as MAE's ``param_groups_weight_decay``: decay on matrices, none on biases, norms,
    tokens and position embeddings. Frozen parameters are left out."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or any(k in name for k in NO_DECAY_NAMES):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def no_decay_names(model: nn.Module) -> list[str]:
    return [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and (p.ndim <= 1 or any(k in n for k in NO_DECAY_NAMES))
    ]


def build_optimizer(groups: Iterable[dict], cfg: OptimConfig, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """AdamW: torch's fused kernel (CPU and CUDA; no JIT build) or NVIDIA apex's FusedAdam.

    DeepSpeed's own FusedAdam is avoided on purpose: it JIT-compiles for ~80 s on first use.
    """
    groups = list(groups)
    if cfg.impl == "apex":
        try:
            from apex.optimizers import FusedAdam  # type: ignore[import-not-found]
        except ImportError:
            raise ConfigError(
                "optim.impl=apex needs NVIDIA apex, which is not installed (it is not on PyPI; the PyPI 'apex' "
                "is unrelated): build it from https://github.com/NVIDIA/apex or use optim.impl=torch"
            ) from None
        if device.type != "cuda":
            raise ConfigError("optim.impl=apex runs on CUDA devices only; use optim.impl=torch")
        return FusedAdam(groups, lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, adam_w_mode=True)
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, fused=fused or None)


def peak_lr(cfg: OptimConfig, global_batch: int) -> float:
    """``optim.lr`` when set, else ``blr · global_batch / 256`` (MAE's linear scaling rule)."""
    return cfg.lr if cfg.lr is not None else cfg.blr * global_batch / 256


def warmup_steps(cfg: OptimConfig, steps_per_epoch: int) -> int:
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    return int(round(cfg.warmup_epochs * steps_per_epoch))


def lr_at(step: int, *, peak: float, min_lr: float, warmup: int, total: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up reaching ``peak`` at step
    ``warmup − 1``, then half-cosine from ``peak`` to ``min_lr`` at ``total``. Per step, as MAE's
    ``adjust_learning_rate`` (which uses fractional epochs)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if total <= warmup:
        return peak
    progress = min(1.0, (step - warmup) / (total - warmup))
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def momentum_at(step: int, cfg: MomentumConfig, total: int) -> float:
    """EMA momentum after optimizer step ``step``: constant, or cosine from ``base`` to 1 (BYOL)."""
    if cfg.schedule == "constant" or total <= 0:
        return cfg.base
    progress = min(1.0, step / total)
    return 1.0 - (1.0 - cfg.base) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


def describe_schedule(cfg: Config, global_batch: int, steps_per_epoch: int, total: int) -> str:
    return (
        f"lr peak {peak_lr(cfg.optim, global_batch):.3g} (global batch {global_batch}), warm-up "
        f"{warmup_steps(cfg.optim, steps_per_epoch)} steps, cosine to {cfg.optim.min_lr:.3g} at step {total}; "
        f"momentum {cfg.momentum.base} ({cfg.momentum.schedule})"
    )
