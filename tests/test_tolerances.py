"""The tolerance helpers: they admit the host differences issue 20 measured and still catch real bugs."""

import numpy as np
import pytest
import torch
from tolerances import assert_close_scaled, assert_no_worse_than, bound, eps, scale_of


def test_bound_scales_with_dtype_magnitude_and_depth():
    assert bound(torch.float32, 1.0) == 16 * torch.finfo(torch.float32).eps
    assert bound(torch.float32, 116.6, depth=4) == pytest.approx(116.6 * 4 * bound(torch.float32, 1.0))
    assert bound(torch.bfloat16, 1.0) / bound(torch.float32, 1.0) == 2**16
    assert eps(np.float64) == np.finfo(np.float64).eps and eps(torch.float64) == eps(np.float64)
    assert scale_of(torch.zeros(3)) == 1.0 and scale_of(torch.tensor([-4.0, 2.0])) == 4.0


def test_amx_host_differences_pass():
    """The two failures issue 20 reported from an AVX512-BF16 + AMX host, at their sizes."""
    g = torch.Generator().manual_seed(0)
    pred_old = torch.randn(4, 64, 48, generator=g)
    pred_old[0, 0, 0] = 3.6  # the prediction's largest magnitude in test_masking
    pred_old[1, 2, 3] = 0.0214  # the element that was off: 1.6e-6 absolute, 7.5e-5 relative to itself
    pred = pred_old.clone()
    pred[1, 2, 3] += 1.6e-6
    assert_close_scaled(pred, pred_old, depth=8)
    with pytest.raises(AssertionError):  # the old per-element bound refused it
        torch.testing.assert_close(pred, pred_old, rtol=1e-5, atol=1e-6)

    ref = torch.tensor(116.6, dtype=torch.float64)  # SDPA exact, Triton 7.6e-6 off, in fp32
    assert_no_worse_than(ref + 7.6e-6, ref, ref.clone(), dtype=torch.float32, depth=4)


@pytest.mark.parametrize("depth", [1, 8, 40])
def test_a_relative_error_of_1e_3_fails_in_fp32(depth):
    ref = torch.randn(64, 48, dtype=torch.float64)
    with pytest.raises(AssertionError, match="max error"):
        assert_close_scaled((ref * (1 + 1e-3)).float(), ref, depth=depth)
    with pytest.raises(AssertionError, match="max error"):  # even when the other path is exact
        assert_no_worse_than((ref * (1 + 1e-3)).float(), ref, ref.float(), depth=depth)


def test_non_finite_and_shape_mismatch_fail():
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close_scaled(torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 1.0]))
    with pytest.raises(AssertionError, match="shape"):
        assert_close_scaled(torch.ones(2), torch.ones(3))
