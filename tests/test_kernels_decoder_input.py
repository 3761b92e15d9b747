"""The Triton decoder-input kernel (un-shuffle + mask tokens + position embedding) against its reference.

The forward and the gradient of x are pure data movement (plus one add in x's dtype): they must be
bit-identical to the reference in the same dtype. The gradients of mask_token and pos_embed are
sums: within about twice PyTorch's own error against the fp64 reference, plus a floor of a few eps of
the dtype times the sum's magnitude (tests/tolerances.py). Outputs start NaN-filled.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from mcf.kernels import _triton_utils as tu  # noqa: E402
from mcf.kernels.decoder_input import _decoder_input_fwd_kernel, decoder_input, decoder_input_ref  # noqa: E402
from tolerances import assert_close_scaled, assert_no_worse_than  # noqa: E402

ON_GPU = torch.cuda.is_available() and not tu.is_interpreted(_decoder_input_fwd_kernel)
DEVICE = "cuda" if ON_GPU else "cpu"
# The floor, in eps(param dtype) x max|exact|: one reduction (over batch and masked positions), rounded once.
FLOOR_EPS = 4


pytestmark = pytest.mark.usefixtures("poison_kernel_outputs")


def inputs(B, K, L, C, dtype, param_dtype, keep, ids_dtype=torch.long, strided_x=False):
    if strided_x:  # a channel slice of a wider tensor
        x = torch.randn(B, 1 + K, C + 8, device=DEVICE).to(dtype)[:, :, 3:3 + C]
    else:
        x = torch.randn(B, 1 + K, C, device=DEVICE).to(dtype)
    mask_token = torch.randn(1, 1, C, device=DEVICE).to(param_dtype)
    pos_embed = torch.randn(1, 1 + L, C, device=DEVICE).to(param_dtype)
    ids_restore = torch.argsort(torch.rand(B, L, device=DEVICE), dim=1).to(ids_dtype)  # as MAE's masking
    keep_lens = None
    if keep == "ragged":  # per-sample visible counts, padded to K: one full, one empty, others between
        keep_lens = torch.randint(0, K + 1, (B,), device=DEVICE)
        keep_lens[0], keep_lens[-1] = K, 0
    return x, mask_token, ids_restore, pos_embed, keep_lens


@pytest.mark.parametrize(
    "B,K,L,C,dtype,param_dtype,keep",
    [
        (3, 5, 16, 40, torch.float32, torch.float32, None),
        (4, 7, 19, 72, torch.float32, torch.float32, "ragged"),
        (3, 9, 9, 33, torch.float32, torch.float32, "ragged"),  # K == L: nothing masked unless padded
        (4, 6, 25, 48, torch.bfloat16, torch.float32, "ragged"),  # autocast: params stay fp32
        (3, 6, 25, 48, torch.bfloat16, torch.bfloat16, None),
        (3, 4, 17, 40, torch.float16, torch.float16, "ragged"),
    ],
    ids=str,
)
def test_matches_reference(B, K, L, C, dtype, param_dtype, keep):
    x, mask_token, ids_restore, pos_embed, keep_lens = inputs(B, K, L, C, dtype, param_dtype, keep)
    leaves = [t.clone().requires_grad_() for t in (x, mask_token, pos_embed)]
    out = decoder_input(leaves[0], leaves[1], ids_restore, leaves[2], keep_lens)
    grad = torch.randn_like(out)
    gx, gmask, gpos = torch.autograd.grad(out, leaves, grad)

    ref_leaves = [t.clone().requires_grad_() for t in (x, mask_token, pos_embed)]
    ref = decoder_input_ref(ref_leaves[0], ref_leaves[1], ids_restore, ref_leaves[2], keep_lens)
    ref_gx, ref_gmask, ref_gpos = torch.autograd.grad(ref, ref_leaves, grad)
    assert out.dtype == ref.dtype == dtype
    assert torch.equal(out, ref), f"forward differs: {(out.double() - ref.double()).abs().max():.3g}"
    assert torch.equal(gx, ref_gx), f"grad x differs: {(gx.double() - ref_gx.double()).abs().max():.3g}"

    leaves64 = [t.double().requires_grad_() for t in (x, mask_token, pos_embed)]
    ref64 = decoder_input_ref(leaves64[0], leaves64[1], ids_restore, leaves64[2], keep_lens)
    _, gmask64, gpos64 = torch.autograd.grad(ref64, leaves64, grad.double())
    for name, got, same, exact in (
        ("grad mask_token", gmask, ref_gmask, gmask64),
        ("grad pos_embed", gpos, ref_gpos, gpos64),
    ):
        assert got.dtype == same.dtype == param_dtype and got.shape == same.shape
        assert_no_worse_than(got, exact, same, dtype=param_dtype, k=FLOOR_EPS, msg=name)


def test_strided_x_int32_ids_and_frozen_pos_embed():
    x, mask_token, ids_restore, pos_embed, keep_lens = inputs(
        3, 5, 14, 40, torch.float32, torch.float32, "ragged", torch.int32, strided_x=True
    )
    x.requires_grad_()
    mask_token.requires_grad_()
    out = decoder_input(x, mask_token, ids_restore, pos_embed, keep_lens)  # pos_embed: no grad (fixed sin-cos)
    ref = decoder_input_ref(x, mask_token, ids_restore.long(), pos_embed, keep_lens)
    assert torch.equal(out, ref)
    grad = torch.randn_like(out)
    for got, want in zip(
        torch.autograd.grad(out, (x, mask_token), grad), torch.autograd.grad(ref, (x, mask_token), grad)
    ):
        assert_close_scaled(got, want)  # grad x: a gather; grad mask_token: one sum, in another order


def test_opcheck():
    x, mask_token, ids_restore, pos_embed, keep_lens = inputs(2, 3, 7, 16, torch.float32, torch.float32, "ragged")
    x.requires_grad_()
    mask_token.requires_grad_()
    pos_embed.requires_grad_()
    torch.library.opcheck(torch.ops.mcf.decoder_input_fwd.default, (x, mask_token, ids_restore, pos_embed, keep_lens))
    torch.library.opcheck(torch.ops.mcf.decoder_input_fwd.default, (x, mask_token, ids_restore, pos_embed, None))
    grad = torch.randn(2, 8, 16, device=DEVICE)
    torch.library.opcheck(
        torch.ops.mcf.decoder_input_bwd.default,
        (grad, ids_restore, keep_lens, 4),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_rejects_bad_inputs():
    x, mask_token, ids_restore, pos_embed, _ = inputs(2, 3, 7, 16, torch.float32, torch.float32, None)
    with pytest.raises(ValueError, match="pos_embed"):
        decoder_input(x, mask_token, ids_restore, pos_embed[:, :-1], None)
    with pytest.raises(ValueError, match="visible slots"):
        decoder_input(x, mask_token, ids_restore[:, :2], pos_embed[:, :3], None)
    with pytest.raises(ValueError, match="keep_lens"):
        decoder_input(x, mask_token, ids_restore, pos_embed, torch.ones(3, dtype=torch.long))
