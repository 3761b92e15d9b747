"""Masked multi-head attention: reference (and, to come, the Triton kernels)."""

from __future__ import annotations

import math

import torch


def masked_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention with an optional per-sample key mask, in plain PyTorch.

    Args:
        q, k, v: ``[B, H, S, D]``.
        key_mask: ``[B, S]`` bool, True where the key may be attended; None attends to all keys.
    Returns:
        ``[B, H, S, D]`` in the dtype of ``q``; a row with no valid key is all zeros.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale  # (B, H, S, S)
    if key_mask is None:
        return torch.matmul(scores.softmax(dim=-1), v)
    keep = key_mask[:, None, None, :]  # (B, 1, 1, S)
    scores = scores.masked_fill(~keep, float("-inf"))
    probs = scores.softmax(dim=-1).nan_to_num(0.0)  # rows with no valid key → zeros
    return torch.matmul(probs, v)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    raise NotImplementedError("the Triton masked-attention kernel is not built yet")
