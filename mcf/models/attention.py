"""Attention dispatch: ``math`` (reference), ``sdpa`` (PyTorch), ``sdpa_fp32``, ``triton`` (mcf kernels), ``auto``.

``auto`` takes, per (device, dtype, sequence length, head dimension), the path that
``mcf bench attention --table`` measured fastest on this class of host
(``mcf.kernels.dispatch.auto_candidate``; its documented default where nothing was measured).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mcf.errors import ConfigError
from mcf.kernels import masked_attention, masked_attention_ref, triton_status  # imports without triton too
from mcf.kernels.dispatch import CANDIDATES, auto_candidate

BACKENDS = ("auto", *CANDIDATES)


def resolve_backend(backend: str, q: torch.Tensor, key_mask: torch.Tensor | None) -> str:
    """The concrete backend for this call (``auto`` resolved, ``triton`` checked)."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown attention backend '{backend}' (choose from {', '.join(BACKENDS)})")
    if backend == "auto":
        return auto_candidate(q, key_mask)
    if backend == "triton":
        ok, reason = triton_status(q)  # device, dtype and head dim
        if not ok:
            raise ConfigError(f"attention.backend=triton cannot run here: {reason}")
    return backend


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, S): every query sees the same keys
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _sdpa_fp32(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """SDPA in fp32, cast back to the input dtype: on CPUs whose fp32 flash kernel beats their bf16 one."""
    if q.dtype == torch.float32:
        return _sdpa(q, k, v, key_mask)
    return _sdpa(q.float(), k.float(), v.float(), key_mask).to(q.dtype)


_PATHS = {"sdpa": _sdpa, "sdpa_fp32": _sdpa_fp32, "math": masked_attention_ref, "triton": masked_attention}


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None,
              backend: str = "auto") -> torch.Tensor:
    """Multi-head attention ``[B, H, S, D] -> [B, H, S, D]`` with an optional key mask ``[B, S]`` (True = attend)."""
    return _PATHS[resolve_backend(backend, q, key_mask)](q, k, v, key_mask)


def candidate(name: str):
    """The function ``(q, k, v, key_mask) -> out`` of one concrete backend (the benchmark times these)."""
    if name not in _PATHS:
        raise ConfigError(f"unknown attention backend '{name}' (choose from {', '.join(_PATHS)})")
    return _PATHS[name]
