"""What the kernel files share: an optional Triton import, the output allocator, dtype helpers.

Triton is an optional extra (``pip install mcf[triton]``; CUDA builds of PyTorch bring it). When it
is missing, the kernel files still import, so their pure-PyTorch references (the ``math`` attention
backend) keep working; only calling a Triton kernel raises, with the import error as the reason.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    TRITON_IMPORT_ERROR: str | None = None
except ImportError as e:  # CPU-only PyTorch wheels do not ship triton
    triton = None
    tl = None
    TRITON_IMPORT_ERROR = f"triton is not installed ({e}); install mcf[triton] or a CUDA build of PyTorch"

# Dtypes the kernels load and store; every kernel accumulates in fp32.
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def jit(fn):
    """``triton.jit``, or, without triton, a stand-in that raises when the kernel is launched.

    Under ``TRITON_INTERPRET=1`` (read by triton when this runs, i.e. when the kernel module is
    imported) the result is an interpreted function that runs on CPU tensors.
    """
    if triton is not None:
        return triton.jit(fn)

    class _Missing:
        __name__ = fn.__name__

        def __getitem__(self, grid):
            raise RuntimeError(f"cannot launch the Triton kernel {fn.__name__}: {TRITON_IMPORT_ERROR}")

    return _Missing()


@jit
def probe_kernel():
    """A kernel that does nothing, jitted when the kernels are (at ``mcf.kernels``' import): whether it
    is interpreted is whether theirs are (:func:`mcf.kernels.dispatch.triton_status` asks it, so the
    dispatcher need not import a kernel module that imports the dispatcher)."""
    pass


def is_interpreted(kernel) -> bool:
    """Whether ``kernel`` (a jitted function) runs in Triton's CPU interpreter."""
    if triton is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate a kernel output; every element must be written by the kernel.

    One place on purpose: the tests replace it with a NaN-filled allocator, so an element a kernel
    forgets to write fails the comparison instead of passing by luck.
    """
    return torch.empty(shape, dtype=dtype, device=device)


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: IEEE fp32 unless PyTorch itself allows TF32 for fp32 matmuls.

    Half-precision inputs ignore it; for fp32 the kernels then match PyTorch's own fp32 matmul.
    """
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


@jit
def cast(x, dtype: tl.constexpr, EMULATE_RTNE: tl.constexpr):
    """``x.to(dtype)``, rounding to nearest even on the GPU and, with EMULATE_RTNE, in the interpreter.

    Triton's interpreter (3.8) truncates fp32 → bf16 where the GPU rounds to nearest even, so the
    kernels set EMULATE_RTNE when interpreted (``emulate_rtne``) and round the bits by hand first.
    """
    if EMULATE_RTNE:
        if dtype == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


def emulate_rtne(kernel) -> bool:
    """The EMULATE_RTNE flag for ``cast`` in ``kernel``: True only in the interpreter."""
    return is_interpreted(kernel)
