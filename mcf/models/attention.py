"""Attention dispatch: ``math`` (reference), ``sdpa`` (PyTorch), ``triton`` (mcf kernels), ``auto``.

``auto`` takes SDPA everywhere except on a GPU for the shapes where the attention benchmark showed
the Triton kernel faster (``mcf.kernels.prefer_triton``); on the CPU it is always SDPA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mcf.errors import ConfigError
from mcf.kernels import masked_attention, masked_attention_ref, prefer_triton, triton_status  # imports without triton too

BACKENDS = ("auto", "sdpa", "triton", "math")


def resolve_backend(backend: str, q: torch.Tensor, key_mask: torch.Tensor | None) -> str:
    """The concrete backend for this call (``auto`` resolved, ``triton`` checked)."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown attention backend '{backend}' (choose from {', '.join(BACKENDS)})")
    if backend == "auto":
        return "triton" if q.device.type == "cuda" and prefer_triton(q, key_mask) else "sdpa"
    if backend == "triton":
        ok, reason = triton_status(q)  # device, dtype and head dim
        if not ok:
            raise ConfigError(f"attention.backend=triton cannot run here: {reason}")
    return backend


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """Multi-head attention ``[B, H, S, D] -> [B, H, S, D]`` with an optional key mask ``[B, S]`` (True = attend)."""
    backend = resolve_backend(backend, q, key_mask)
    if backend == "sdpa":
        mask = None if key_mask is None else key_mask[:, None, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if backend == "math":
        return masked_attention_ref(q, k, v, key_mask)
    return masked_attention(q, k, v, key_mask)
