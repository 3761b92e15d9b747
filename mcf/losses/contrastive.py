"""Momentum contrastive InfoNCE (MoCo v3) with keys gathered from every rank."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from mcf.dist import all_gather_no_grad


class ContrastiveLoss(nn.Module):
    """``CE(q·kᵀ/τ, arange(N) + N·rank) · 2τ`` with q, k L2-normalised and k gathered from all ranks.

    ``rank`` and ``world_size`` are given (the trainer sets them); with ``world_size == 1`` no
    collective is called, so the loss runs without a process group. ``gather`` is the collective
    (replaceable in tests).
    """

    def __init__(self, temperature: float = 0.2, rank: int = 0, world_size: int = 1,
                 gather: Callable[[torch.Tensor], torch.Tensor] = all_gather_no_grad):
        super().__init__()
        self.temperature = temperature
        self.rank, self.world_size = rank, world_size
        self.gather = gather

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        q = F.normalize(q.float(), dim=1)  # (N, C)
        k = F.normalize(k.float(), dim=1).detach()
        if self.world_size > 1:
            k = self.gather(k)  # (N·world, C)
        logits = q @ k.t() / self.temperature  # (N, N·world)
        N = q.shape[0]
        labels = torch.arange(N, device=q.device) + N * self.rank
        return F.cross_entropy(logits, labels) * (2 * self.temperature)
