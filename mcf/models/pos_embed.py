"""Fixed 2-D sin-cos position embeddings (MAE convention) and their interpolation."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """``[M] -> [M, dim]``: sin of the first half of the frequencies, cos of the second."""
    assert dim % 2 == 0
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # (dim/2,)
    out = pos.reshape(-1).to(torch.float64)[:, None] * omega[None, :]  # (M, dim/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(dim: int, grid_size: int, cls_token: bool = True) -> torch.Tensor:
    """``[1 (+1), grid², dim]`` float32 embedding.

    As in MAE: the first half of the channels encodes the column (w), the second half the row (h);
    the class token's embedding (when ``cls_token``) is zeros and comes first.
    """
    assert dim % 4 == 0, "sin-cos 2-D position embedding needs dim divisible by 4"
    coords = torch.arange(grid_size, dtype=torch.float64)
    grid_h, grid_w = torch.meshgrid(coords, coords, indexing="ij")  # (G, G) each; h = row
    emb = torch.cat([sincos_1d(dim // 2, grid_w), sincos_1d(dim // 2, grid_h)], dim=1)  # (G*G, dim)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=torch.float64), emb], dim=0)
    return emb.float().unsqueeze(0)


def interpolate_pos_embed(pos_embed: torch.Tensor, num_patches: int, num_prefix: int = 1) -> torch.Tensor:
    """Resize ``[1, num_prefix + G0², D]`` to ``[1, num_prefix + num_patches, D]`` (bicubic)."""
    old = pos_embed.shape[1] - num_prefix
    if old == num_patches:
        return pos_embed
    g0, g1 = int(round(old**0.5)), int(round(num_patches**0.5))
    if g0 * g0 != old or g1 * g1 != num_patches:
        raise ValueError(f"cannot interpolate a position embedding of {old} patches to {num_patches}")
    prefix, grid = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    dim = grid.shape[-1]
    grid = grid.reshape(1, g0, g0, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(g1, g1), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, g1 * g1, dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)
