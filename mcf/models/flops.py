"""Model FLOPs as PyTorch counts them (``torch.utils.flop_counter.FlopCounterMode``).

The counter sees matrix products, convolutions and the fused attention ops of the CUDA backends;
it does not see the CPU's fused SDPA kernel. Counting is therefore done on the math attention path
(plain ``matmul``), which gives the same count on every device and backend.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of everything ``fn`` runs (forward and, if it calls it, backward), 1 FMA = 2 FLOPs."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


class CastCounter(TorchDispatchMode):
    """Counts the dtype conversions that reach ATen while active: ``_to_copy`` to another dtype
    (``.to``, ``.float()``, autocast's casts) and ``copy_`` between dtypes, forward and backward.

    ``calls``, ``bytes`` (of the converted output) and ``by_pair`` (``"float32->bfloat16"`` → calls).
    Compiled code is not seen (inductor fuses its casts into kernels)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls, self.bytes, self.by_pair = 0, 0, Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        src = dst = None
        if func is torch.ops.aten._to_copy.default and isinstance(out, torch.Tensor):
            src, dst = args[0], out
        elif func is torch.ops.aten.copy_.default:
            src, dst = args[1], args[0]
        if src is not None and isinstance(src, torch.Tensor) and src.dtype != dst.dtype:
            self.calls += 1
            self.bytes += dst.numel() * dst.element_size()
            self.by_pair[f"{str(src.dtype)[6:]}->{str(dst.dtype)[6:]}"] += 1
        return out

    def summary(self) -> dict[str, Any]:
        return {"calls": self.calls, "mbytes": round(self.bytes / 1e6, 3), "by_pair": dict(self.by_pair.most_common())}


def use_math_attention(model: nn.Module) -> None:
    """Every attention of an MCF model on the plain-matmul path the counter sees (mcf's blocks and the teacher's)."""
    model.set_attention_backend("math")


def meta_model(build: Callable[[], nn.Module], batch: int) -> tuple[nn.Module, torch.Tensor]:
    """The MCF model ``build()`` makes, on the meta device in train mode, every attention on the math
    path and no activation checkpointing, with a ``[batch, 3, H, W]`` meta batch of its input size:
    what a FLOP count runs (nothing is allocated or computed)."""
    with torch.device("meta"):
        model = build()
    model = model.to("meta").train()
    use_math_attention(model)
    model.set_activation_checkpointing("none")
    size = model.spec.img_size
    return model, torch.empty(batch, 3, size, size, device="meta")


def step_flops(build: Callable[[], nn.Module], batch: int) -> int:
    """FLOPs of one training step of the MCF model ``build()`` makes, on ``batch`` images: the online
    forward and backward, the target's forward, the teacher's two passes and the backward through the
    rebuilt one. Counted on the meta device (no memory, no arithmetic: seconds even for ViT-H), on
    the math attention path, without activation checkpointing (its recomputation is not model FLOPs)."""
    model, images = meta_model(build, batch)

    def fwd_bwd() -> None:
        model(images).loss.backward()

    return count_flops(fwd_bwd)


def linear_flops(
    batch: int, in_features: int, out_features: int, backward: bool = True, weight_grad: bool = True
) -> int:
    """Analytic count of ``nn.Linear`` on ``[batch, in]``: 2·b·i·o forward, the same again for the
    input gradient and for the weight gradient (the bias adds no matmul FLOPs)."""
    fwd = 2 * batch * in_features * out_features
    return fwd + (fwd if backward else 0) + (fwd if backward and weight_grad else 0)


def attention_block_flops(batch: int, seq: int, dim: int, mlp_ratio: float = 4.0, backward: bool = True) -> int:
    """Analytic matmul FLOPs of one pre-norm ViT block (qkv, q·kᵀ, attn·v, proj, 2-layer MLP)
    forward, ×3 with backward (the backward of each product is two products of its size)."""
    tokens = batch * seq
    hidden = int(dim * mlp_ratio)
    fwd = 2 * tokens * dim * (3 * dim) + 2 * tokens * dim * dim + 2 * tokens * dim * hidden * 2
    fwd += 2 * 2 * batch * seq * seq * dim  # q·kᵀ and attn·v over all heads
    return fwd * (3 if backward else 1)
