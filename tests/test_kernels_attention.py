"""The Triton masked attention against its reference upcast to fp64.

On the CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set in conftest) at tiny
shapes; the error of the kernel must stay within about twice PyTorch's own error in the same dtype
(the reference run in that dtype), plus a floor of a few eps of the dtype times the values' magnitude
(tests/tolerances.py: PyTorch's error can be ~0 at these sizes, and is 0 on some hosts). Every
kernel output is allocated NaN-filled, so an element a kernel does not write fails.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from mcf.kernels import _triton_utils as tu  # noqa: E402
from mcf.kernels.masked_attention import _attn_fwd_kernel, masked_attention, masked_attention_ref  # noqa: E402
from tolerances import K_DEFAULT, assert_close_scaled, assert_no_worse_than  # noqa: E402

INTERPRETED = tu.is_interpreted(_attn_fwd_kernel)
ON_GPU = torch.cuda.is_available() and not INTERPRETED
DEVICE = "cuda" if ON_GPU else "cpu"
NEEDS_GPU = pytest.mark.skipif(
    not ON_GPU, reason="needs a CUDA GPU and TRITON_INTERPRET=0 (conftest turns the CPU interpreter on by default)"
)
# The floor, in eps(dtype) x max|ref64|. fp32: two chained reductions (QK^T then PV; dS then dS K in the
# backward) at tolerances.K_DEFAULT eps each; a 1e-3 relative fp32 error is ~8000 eps, far above it.
# fp16/bf16: the kernels accumulate in fp32, so what counts in the dtype's eps is the rounding of P and
# of the output (2 eps); 2 x PyTorch's own (large) 16-bit error is the main term there.
FLOOR_EPS = {torch.float32: 2 * K_DEFAULT, torch.float16: 2, torch.bfloat16: 2}


pytestmark = pytest.mark.usefixtures("poison_kernel_outputs")


def assert_within_torch_error(name: str, got: torch.Tensor, ref_same_dtype: torch.Tensor, ref64: torch.Tensor) -> None:
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(got).all(), f"{name}: {int((~torch.isfinite(got)).sum())} non-finite elements"
    assert_no_worse_than(got, ref64, ref_same_dtype, dtype=got.dtype, k=FLOOR_EPS[got.dtype], msg=name)


def make_key_mask(kind: str, B: int, S: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(what the kernel takes, the equivalent [B, S] bool mask for the reference)."""
    if kind == "none":
        return None, None
    if kind == "random":  # arbitrary pattern; sample 1 has no valid key at all
        mask = torch.rand(B, S) < 0.7
        mask[0, 0] = True
        mask[1] = False
        return mask.to(DEVICE), mask.to(DEVICE)
    if kind == "blocks":  # valid keys only at both ends: whole key blocks in between are skipped
        mask = torch.zeros(B, S, dtype=torch.bool)
        mask[:, :3] = True
        mask[:, S - 5:] = True
        mask[-1, S - 5:] = False
        return mask.to(DEVICE), mask.to(DEVICE)
    if kind in ("lengths", "prefix"):  # MCF's padded visible sets: a valid prefix per sample
        lens = torch.tensor([S - 3, 0] + [S] * (B - 2))[:B]
        mask = torch.arange(S)[None, :] < lens[:, None]
        return (lens.to(DEVICE) if kind == "lengths" else mask.to(DEVICE)), mask.to(DEVICE)
    raise ValueError(kind)


def run_case(B, H, S_Q, S_K, D, dtype, mask_kind, strided=False):
    def rand(S):
        if strided:  # [B, S, H, D] viewed as [B, H, S, D], as after a qkv projection
            return torch.randn(B, S, H, D, device=DEVICE).transpose(1, 2).to(dtype)
        return torch.randn(B, H, S, D, device=DEVICE).to(dtype)

    q, k, v = rand(S_Q), rand(S_K), rand(S_K)
    dout = rand(S_Q)
    kernel_mask, ref_mask = make_key_mask(mask_kind, B, S_K)

    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = masked_attention(*leaves, kernel_mask)
    grads = torch.autograd.grad(out, leaves, dout)

    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out64 = masked_attention_ref(*leaves64, ref_mask)
    grads64 = torch.autograd.grad(out64, leaves64, dout.double())

    leaves_dt = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out_dt = masked_attention_ref(*leaves_dt, ref_mask)
    grads_dt = torch.autograd.grad(out_dt, leaves_dt, dout)

    assert out.dtype == dtype
    assert_within_torch_error("out", out, out_dt, out64)
    for name, g, g_dt, g64 in zip(("dq", "dk", "dv"), grads, grads_dt, grads64):
        assert g.dtype == dtype
        assert_within_torch_error(name, g, g_dt, g64)
    if ref_mask is not None:
        empty = ~ref_mask.any(dim=1)  # samples with no valid key: exact zeros, never NaN
        assert (out[empty] == 0).all() and (grads[0][empty] == 0).all()
        masked_keys = ~ref_mask[:, None, :, None].expand_as(grads[1])  # masked keys get no gradient
        assert (grads[1][masked_keys] == 0).all() and (grads[2][masked_keys] == 0).all()


@pytest.mark.parametrize(
    "B,H,S_Q,S_K,D,dtype,mask_kind",
    [
        (2, 2, 37, 37, 32, torch.float32, "random"),
        (2, 2, 70, 70, 64, torch.float32, "blocks"),
        (2, 2, 50, 50, 40, torch.float32, "none"),  # head dim padded to 64
        (3, 2, 33, 33, 32, torch.float32, "lengths"),
        (2, 2, 20, 45, 32, torch.float32, "random"),  # S_Q != S_K
        (2, 2, 37, 37, 32, torch.bfloat16, "random"),
        (2, 1, 50, 50, 32, torch.bfloat16, "lengths"),
        (2, 2, 37, 37, 32, torch.float16, "random"),
        (2, 2, 45, 45, 64, torch.float16, "blocks"),
        (2, 2, 17, 17, 32, torch.float16, "none"),
    ],
    ids=str,
)
def test_matches_reference(B, H, S_Q, S_K, D, dtype, mask_kind):
    run_case(B, H, S_Q, S_K, D, dtype, mask_kind)


def test_strided_inputs_and_gradient():
    run_case(2, 2, 29, 29, 32, torch.float32, "prefix", strided=True)


def test_every_key_masked_gives_zeros():
    q, k, v = (torch.randn(2, 2, 19, 32, device=DEVICE, requires_grad=True) for _ in range(3))
    for key_mask in (
        torch.zeros(2, 19, dtype=torch.bool, device=DEVICE),
        torch.zeros(2, dtype=torch.long, device=DEVICE),
    ):
        out = masked_attention(q, k, v, key_mask)
        grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
        assert (out == 0).all()
        assert all((g == 0).all() for g in grads)


def test_scale_argument():
    q, k, v = (torch.randn(1, 2, 21, 32, device=DEVICE) for _ in range(3))
    out = masked_attention(q, k, v, scale=0.3)
    ref = masked_attention_ref(q * (0.3 * math.sqrt(32)), k, v)  # the reference scales by 1/sqrt(D)
    assert_close_scaled(out, ref, depth=2)  # kernel vs reference in fp32: two chained reductions


def test_rejects_bad_inputs():
    q = torch.randn(2, 2, 8, 32, device=DEVICE)
    with pytest.raises(ValueError, match="do not agree"):
        masked_attention(q, q[:, :1], q[:, :1])
    with pytest.raises(ValueError, match="key_mask"):
        masked_attention(q, q, q, torch.ones(2, 8, device=DEVICE))
    with pytest.raises(ValueError, match="key_mask"):
        masked_attention(q, q, q, torch.ones(2, 7, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="dtype"):
        masked_attention(q.double(), q.double(), q.double())


def test_opcheck_forward_and_backward_ops():
    """Schema, fake (shape) implementation, autograd registration and AOT dispatch of the ops."""
    q, k, v = (torch.randn(1, 2, 19, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    mask = torch.rand(1, 19, device=DEVICE) < 0.6
    torch.library.opcheck(torch.ops.mcf.masked_attention_fwd.default, (q, k, v, mask, None, 0.25))
    torch.library.opcheck(
        torch.ops.mcf.masked_attention_fwd.default,
        (q, k, v, None, torch.tensor([11], dtype=torch.int32, device=DEVICE), 0.25),
    )
    out, lse = torch.ops.mcf.masked_attention_fwd(q, k, v, mask, None, 0.25)
    args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse, mask, None, 0.25)
    torch.library.opcheck(
        torch.ops.mcf.masked_attention_bwd.default, args, test_utils=("test_schema", "test_faketensor")
    )


def test_torch_compile_traces_the_op():
    q, k, v = (torch.randn(2, 2, 23, 32, device=DEVICE, requires_grad=True) for _ in range(3))
    mask = torch.rand(2, 23, device=DEVICE) < 0.7

    def f(q, k, v, mask):
        return masked_attention(q, k, v, mask).square().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    loss = compiled(q, k, v, mask)
    grads = torch.autograd.grad(loss, (q, k, v))
    loss_ref = f(q, k, v, mask)
    grads_ref = torch.autograd.grad(loss_ref, (q, k, v))
    # bit-exact: aot_eager runs the same registered ops as eager, on one host
    assert torch.equal(loss, loss_ref)
    for g, g_ref in zip(grads, grads_ref):
        assert torch.equal(g, g_ref)


# ---------------------------------------------------------------------------------------------
# GPU only: the compiled kernels at MCF's shapes and with Inductor
# ---------------------------------------------------------------------------------------------


@NEEDS_GPU
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("S,mask_kind", [(50, "lengths"), (197, "none"), (197, "random"), (197, "blocks")])
def test_gpu_mcf_shapes(dtype, S, mask_kind):
    run_case(8, 12, S, S, 64, dtype, mask_kind)


@NEEDS_GPU
@pytest.mark.parametrize("D", [32, 80, 128])
def test_gpu_head_dims(D):
    run_case(4, 4, 130, 130, D, torch.bfloat16, "random")
    run_case(4, 4, 130, 130, D, torch.float32, "random")


@NEEDS_GPU
def test_gpu_inductor():
    q, k, v = (torch.randn(4, 12, 197, 64, device=DEVICE, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    lens = torch.randint(1, 198, (4,), device=DEVICE)
    f = lambda q, k, v: masked_attention(q, k, v, lens).float().square().sum()  # noqa: E731
    loss = torch.compile(f, fullgraph=True)(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    grads_ref = torch.autograd.grad(f(q, k, v), (q, k, v))
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)
