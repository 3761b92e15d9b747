"""Decoder input assembly: un-shuffle, fill mask tokens, add position embedding (reference)."""

from __future__ import annotations

import torch


def decoder_input_ref(x: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor, pos_embed: torch.Tensor, keep_lens: torch.Tensor | None = None) -> torch.Tensor:
    """MAE's gather/cat/add sequence, generalised to per-sample visible counts.

    Args:
        x: ``[B, 1 + K, C]`` class token then the K (padded) visible tokens, in shuffled order.
        mask_token: ``[1, 1, C]``.
        ids_restore: ``[B, L]`` int64; position l takes shuffled index ``ids_restore[b, l]``.
        pos_embed: ``[1, 1 + L, C]`` (class position first).
        keep_lens: ``[B]`` visible tokens per sample (indices >= keep_lens[b] are mask tokens);
            None means all K are visible.
    Returns:
        ``[B, 1 + L, C]``.
    """
    B, K1, C = x.shape
    L = ids_restore.shape[1]
    vis = x[:, 1:, :]
    if keep_lens is not None:  # padded visible slots become mask tokens
        slot = torch.arange(K1 - 1, device=x.device)
        vis = torch.where((slot[None, :] < keep_lens[:, None])[..., None], vis, mask_token.to(vis.dtype))
    tokens = torch.cat([vis, mask_token.to(x.dtype).expand(B, L + 1 - K1, C)], dim=1)  # (B, L, C)
    tokens = torch.gather(tokens, 1, ids_restore[..., None].expand(B, L, C))
    return torch.cat([x[:, :1, :], tokens], dim=1) + pos_embed.to(x.dtype)


def decoder_input(x: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor, pos_embed: torch.Tensor, keep_lens: torch.Tensor | None = None) -> torch.Tensor:
    raise NotImplementedError("the Triton decoder-input kernel is not built yet")
