"""MAE's pixel reconstruction loss on the removed patches (an ablation; weight 0 in the paper)."""

from __future__ import annotations

import torch


def patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """``[N, 3, H, W] -> [N, L, p·p·3]`` (row-major patches, channels last within a patch)."""
    N, C, H, W = images.shape
    h, w = H // p, W // p
    x = images.reshape(N, C, h, p, w, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(N, h * w, p * p * C)


def unpatchify(x: torch.Tensor, p: int, channels: int = 3) -> torch.Tensor:
    """``[N, L, p·p·3] -> [N, 3, H, W]``, the inverse of :func:`patchify`."""
    N, L, _ = x.shape
    h = int(round(L**0.5))
    x = x.reshape(N, h, h, p, p, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(N, channels, h * p, h * p)


def pixel_loss(
    images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix: bool = False
) -> torch.Tensor:
    """Mean squared error per patch, averaged over removed patches (``mask == 1``)."""
    target = patchify(images, patch_size).float()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    loss = ((pred.float() - target) ** 2).mean(dim=-1)  # (N, L)
    return (loss * mask).sum() / mask.sum().clamp(min=1)
