"""Projector and predictor MLPs of the momentum contrastive branch (MoCo v3 layout)."""

from __future__ import annotations

import torch.nn as nn


def build_mlp(
    num_layers: int, in_dim: int, hidden: int, out_dim: int, last_bn: bool = True, track_running_stats: bool = True
) -> nn.Sequential:
    """Linear (no bias) → BN → ReLU, …, Linear (no bias) [→ BN(affine=False)].

    Indices match the released ``nn.Sequential`` (``0`` Linear, ``1`` BN, ``2`` ReLU, ``3`` Linear,
    ``4`` BN). ``track_running_stats=False`` makes BN use batch statistics in eval mode too: the
    target projector does, so that it normalises as the released code's (always in train mode) did.
    """
    layers: list[nn.Module] = []
    for i in range(num_layers):
        d_in = in_dim if i == 0 else hidden
        d_out = out_dim if i == num_layers - 1 else hidden
        layers.append(nn.Linear(d_in, d_out, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(d_out, track_running_stats=track_running_stats), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(d_out, affine=False, track_running_stats=track_running_stats))
    return nn.Sequential(*layers)


def build_projector(dim: int, hidden: int = 4096, out: int = 256, target: bool = False) -> nn.Sequential:
    return build_mlp(2, dim, hidden, out, last_bn=True, track_running_stats=not target)


def build_predictor(dim: int = 256, hidden: int = 4096) -> nn.Sequential:
    return build_mlp(2, dim, hidden, dim, last_bn=False)
