"""Float tolerances that hold on every CPU host class (AVX2-only, AVX512-BF16, AVX512-BF16 + AMX).

Why hosts differ. oneDNN and ATen pick their GEMM / attention kernels by ISA: an AMX host blocks a
matrix product in 16x32 tiles and accumulates in another order than an AVX512 or AVX2 host, and the
thread count changes how a reduction is split. Every reduction of ``n`` terms is then rounded
differently; IEEE arithmetic only promises that each result is within a few units in the last place
(``u = eps / 2``) of the exact one *relative to the magnitude of the terms*, not of the result:

    |fl(sum a_i) - sum a_i| <= gamma_n * sum |a_i|,   gamma_n = n u / (1 - n u)     (Higham, Thm. 3.1)

In practice (random rounding) the error grows like ``sqrt(n) u`` and, for a blocked GEMM, like
``log(n) u``; a network of ``depth`` such stages (layers, each a few reductions plus a softmax or a
normalisation with condition number O(1) at initialisation) adds one such term per stage to first
order. So two hosts can disagree on a value by

    k * eps(dtype) * scale * depth

where ``scale`` is the magnitude of the values being summed -- taken as ``max |ref|`` of the compared
tensor, because an element that happens to come out near 0 (cancellation) carries the absolute error
of its neighbours, never a relative one of its own -- and ``k`` absorbs the per-stage constant
(``k = 16`` by default: ~4 eps per reduction, a few reductions per stage). A bound built this way:

- scales with the values (a loss of 116 gets 116 times the slack of a loss of 1),
- scales with the dtype (bf16 gets 65536 times the slack of fp32),
- still catches real bugs: at ``depth <= 20`` an fp32 comparison allows at most 16 * 20 * 1.2e-7 =
  3.8e-5 of ``max |ref|``, far below the 1e-3 relative error of a wrong constant, a dropped term or a
  mis-masked key.

Exactness assertions (``torch.equal``) stay where bit-identity is the property under test: the same
code path run twice on one host, a resume that must reproduce the next step, a copy or a load of
weights, an index gather. Those never go through this module.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch

# Per-stage constant: ~4 units of eps per reduction, a few reductions per stage (see the module docstring).
K_DEFAULT = 16.0
# MCF_TOL_REPORT=1 prints every comparison's error / bound (run pytest with -s) to see the margins on a new host.
_REPORT = os.environ.get("MCF_TOL_REPORT") == "1"


def _report(kind: str, msg: str, err: float, allowed: float) -> None:
    if _REPORT:
        print(f"[tolerance] {kind} {msg or '-'}: error {err:.3g} / allowed {allowed:.3g} = {err / allowed:.3g}",
              file=sys.stderr)


def eps(dtype: torch.dtype | np.dtype | type) -> float:
    """Machine epsilon of a torch or numpy floating dtype (fp64 2.2e-16, fp32 1.2e-7, bf16 7.8e-3)."""
    if isinstance(dtype, torch.dtype):
        return torch.finfo(dtype).eps
    return float(np.finfo(dtype).eps)


def _as_tensor(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    return torch.as_tensor(np.asarray(x))


def scale_of(ref) -> float:
    """The magnitude errors are measured against: ``max |ref|`` (1.0 for an all-zero or empty ``ref``,
    so a reference that is exactly 0 still gets the dtype's absolute slack at unit scale)."""
    r = _as_tensor(ref)
    m = float(r.double().abs().max()) if r.numel() else 0.0
    return m if m > 0 else 1.0


def bound(dtype, scale: float, depth: float = 1, k: float = K_DEFAULT) -> float:
    """``k * eps(dtype) * scale * depth``: what two correct implementations may differ by (module docstring)."""
    return k * eps(dtype) * scale * depth


def max_error(got, ref) -> float:
    """``max |got - ref|`` computed in fp64 (so the comparison itself adds no rounding)."""
    g, r = _as_tensor(got), _as_tensor(ref)
    assert g.shape == r.shape, f"shape {tuple(g.shape)} != {tuple(r.shape)}"
    if not g.numel():
        return 0.0
    return float((g.double() - r.double()).abs().max())


def _dtype_of(got, dtype):
    if dtype is not None:
        return dtype
    if isinstance(got, torch.Tensor):
        return got.dtype
    return getattr(got, "dtype", np.float64) if not isinstance(got, float) else np.float64


def assert_close_scaled(got, ref, dtype=None, depth: float = 1, k: float = K_DEFAULT, scale: float | None = None,
                        msg: str = "") -> None:
    """Assert ``max |got - ref| <= k * eps(dtype) * scale * depth``, ``scale = max |ref|`` unless given.

    Args:
        got, ref: tensors / arrays / floats of one shape; NaN or inf anywhere in ``got`` fails.
        dtype: the precision the computation ran in (default: ``got``'s dtype). Pass fp32 for an fp32
            path compared with an fp64 reference.
        depth: the number of rounding stages on the longest path (layers, chained reductions); 1 for a
            single op.
        k: the per-stage constant (module docstring); raise it only with a comment saying why.
        scale: the magnitude of the terms when it is not ``max |ref|`` (e.g. a difference of large values).
    """
    g = _as_tensor(got)
    assert g.shape == _as_tensor(ref).shape, f"{msg}: shape {tuple(g.shape)} != {tuple(_as_tensor(ref).shape)}"
    assert bool(torch.isfinite(g).all()) if g.is_floating_point() else True, f"{msg}: non-finite values"
    s = scale_of(ref) if scale is None else scale
    dt = _dtype_of(got, dtype)
    err, b = max_error(got, ref), bound(dt, s, depth, k)
    _report("close", msg, err, b)
    assert err <= b, (f"{msg + ': ' if msg else ''}max error {err:.3g} > {k:g} x eps({dt}) {eps(dt):.3g}"
                      f" x scale {s:.3g} x depth {depth:g} = {b:.3g}")


def assert_no_worse_than(got, ref, other, dtype=None, depth: float = 1, k: float = K_DEFAULT, factor: float = 2.0,
                         msg: str = "") -> None:
    """Assert ``got``'s error against ``ref`` is at most ``factor`` times ``other``'s, plus a floor.

    The flash-attention test pattern: ``ref`` is the computation upcast to fp64, ``other`` the same
    computation by PyTorch in ``dtype``; the kernel under test (``got``) may be ``factor`` times as
    wrong as PyTorch. The floor ``k * eps(dtype) * max|ref| * depth`` is what makes the bound mean
    something when ``other`` happens to be exact (an AMX host whose SDPA equals the reference
    bit-for-bit would otherwise demand exactness of every other kernel): one host's rounding is
    never required of another.
    """
    dt = _dtype_of(got, dtype)
    err, other_err = max_error(got, ref), max_error(other, ref)
    floor = bound(dt, scale_of(ref), depth, k)
    g = _as_tensor(got)
    assert bool(torch.isfinite(g).all()) if g.is_floating_point() else True, f"{msg}: non-finite values"
    _report("no-worse", msg, err, factor * other_err + floor)
    assert err <= factor * other_err + floor, (
        f"{msg + ': ' if msg else ''}max error {err:.3g} > {factor:g} x the other path's {other_err:.3g}"
        f" + floor {floor:.3g} ({k:g} x eps({dt}) x scale {scale_of(ref):.3g} x depth {depth:g})")

