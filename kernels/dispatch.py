"""Can the Triton kernels run here, and should ``attention.backend=auto`` use them?

``triton_status`` answers the first question (with a reason a user can act on); ``prefer_triton``
the second, from measurements only: a shape gets the Triton kernel under ``auto`` only if
``benchmarks/bench_attention.py`` showed it faster than SDPA on that GPU.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from mcf.kernels import _triton_utils as tu

# Largest head dimension the attention kernels take (padded to a power of two inside).
MAX_HEAD_DIM = 256


@dataclass(frozen=True)
class TritonFaster:
    """One measured shape range where the Triton attention beat SDPA (forward + backward).

    Rows come from ``python benchmarks/bench_attention.py --json OUT`` run on the GPU: it prints
    the rows in this form for every shape where Triton was at least ``--min-speedup`` faster.
    """

    device: str
    """Prefix of ``torch.cuda.get_device_name()``, e.g. ``"NVIDIA H100"``."""
    dtype: torch.dtype
    head_dim: int
    min_tokens: int
    """Sequence lengths (keys) from ``min_tokens`` to ``max_tokens`` inclusive."""
    max_tokens: int
    masked: bool
    """Whether the measurement used a key mask (SDPA then cannot use its flash kernel)."""
    speedup: float
    """SDPA time / Triton time, forward + backward, median of repeats."""
    source: str
    """Where the number comes from: benchmark JSON file, date, commit."""


# Empty on purpose. No GPU measurement of these kernels exists yet (they were written and tested
# under the Triton CPU interpreter only), and the flash-attention reports (issues #462, #591) find
# little or no gain over library attention below ~200 tokens, which is where MCF lives (50 and 197
# tokens). Until a benchmark run on a GPU shows a win, ``auto`` means SDPA everywhere. To fill it:
# run ``python benchmarks/bench_attention.py --json bench.json`` on the target GPU and paste the
# ``TritonFaster(...)`` rows it prints, naming the JSON file in ``source``.
TRITON_FASTER: tuple[TritonFaster, ...] = ()


def _device_of(where) -> torch.device:
    if where is None:
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if isinstance(where, torch.Tensor):
        return where.device
    return torch.device(where)


def triton_status(where: torch.Tensor | torch.device | str | None = None) -> tuple[bool, str]:
    """Whether the mcf Triton kernels can run on ``where``, and why (not).

    Args:
        where: a tensor (its device, dtype and, for ``[B, H, S, D]`` tensors, head dimension are
            checked), a device, or None for the default device.
    Returns:
        ``(ok, reason)``; ``reason`` says what runs (``ok``) or what to change (not ``ok``).
    """
    if tu.triton is None:
        return False, tu.TRITON_IMPORT_ERROR
    interpreted = tu.is_interpreted(tu.probe_kernel)
    device = _device_of(where)
    if isinstance(where, torch.Tensor):
        if where.dtype not in tu.SUPPORTED_DTYPES:
            return False, f"the Triton kernels take float32, bfloat16 or float16 tensors, not {where.dtype}"
        if where.dim() == 4 and where.shape[-1] > MAX_HEAD_DIM:
            return False, f"the Triton attention takes head dimensions up to {MAX_HEAD_DIM}, not {where.shape[-1]}"
    if device.type == "cpu":
        if interpreted:
            return True, "Triton interpreter (TRITON_INTERPRET=1) on CPU tensors: correct but slow, for tests"
        return False, ("the Triton kernels need a CUDA GPU; on the CPU they run only in Triton's interpreter, "
                       "with TRITON_INTERPRET=1 set before mcf.kernels is imported")
    if device.type != "cuda":
        return False, f"mcf has no Triton kernels for device type '{device.type}'"
    if interpreted:
        return True, "Triton interpreter (TRITON_INTERPRET=1): tensors are copied to the CPU, slow"
    if not torch.cuda.is_available():
        return False, "CUDA is not available to PyTorch"
    index = device.index if device.index is not None else torch.cuda.current_device()
    if torch.version.hip is None:
        major, minor = torch.cuda.get_device_capability(index)
        if major < 8:
            return False, f"the Triton kernels need compute capability >= 8.0 (bf16 tensor cores); {_device_name(index)} is {major}.{minor}"
        if isinstance(where, torch.Tensor) and where.dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            return False, f"{_device_name(index)} does not support bfloat16"
    return True, f"Triton {tu.triton.__version__} on {_device_name(index)}"


@functools.cache
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def prefer_triton(q: torch.Tensor, key_mask: torch.Tensor | None = None, table: tuple[TritonFaster, ...] | None = None) -> bool:
    """The ``auto`` policy: use the Triton attention for this call?

    True only on a CUDA device where Triton can run and ``(device, dtype, head dim, tokens, masked)``
    falls in a measured row of ``table`` (default ``TRITON_FASTER``, empty until measured: see there).
    False on the CPU, where SDPA is always the choice.

    Args:
        q: ``[B, H, S, D]`` queries.
        key_mask: ``[B, S]`` bool key mask or ``[B]`` valid lengths, or None.
        table: the measured rows; for tests and for trying a fresh benchmark's rows.
    """
    if q.device.type != "cuda" or not triton_status(q)[0]:
        return False
    rows = TRITON_FASTER if table is None else table
    if not rows:
        return False
    name = _device_name(q.device.index if q.device.index is not None else torch.cuda.current_device())
    tokens, head_dim, masked = q.shape[-2], q.shape[-1], key_mask is not None
    return any(_row_matches(r, name, q.dtype, head_dim, tokens, masked) for r in rows)


def _row_matches(row: TritonFaster, device_name: str, dtype: torch.dtype, head_dim: int, tokens: int, masked: bool) -> bool:
    return (device_name.startswith(row.device) and row.dtype == dtype and row.head_dim == head_dim and row.masked == masked
            and row.min_tokens <= tokens <= row.max_tokens)
