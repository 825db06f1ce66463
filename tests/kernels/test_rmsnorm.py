"""Fused RMSNorm (interpreted) against the model's torch expression, gradients included."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import assert_close, interpret  # noqa: F401

from raymoe.kernels.rmsnorm import rms_norm, rms_norm_reference


@pytest.mark.parametrize(
    "x_dtype,w_dtype",
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float16),
    ],
)
@pytest.mark.parametrize("shape", [(1, 7), (3, 5, 40), (19, 600)])
def test_matches_reference(shape: tuple[int, ...], x_dtype: torch.dtype, w_dtype: torch.dtype) -> None:
    x = (torch.randn(shape) * 3).to(x_dtype)
    weight = (1 + 0.1 * torch.randn(shape[-1])).to(w_dtype)
    out = rms_norm(x, weight, 1e-6)
    expected = rms_norm_reference(x, weight, 1e-6)
    assert out.dtype == expected.dtype  # the promoted dtype, as the model's expression gives
    assert_close(out, expected, x_dtype if x_dtype != torch.float32 else w_dtype, "rmsnorm")


def test_gradients_match_reference() -> None:
    x = torch.randn(6, 33, requires_grad=True)
    weight = (1 + 0.1 * torch.randn(33)).requires_grad_()
    grad = torch.randn(6, 33)
    ours = torch.autograd.grad(rms_norm(x, weight, 1e-5), (x, weight), grad)
    ref = torch.autograd.grad(rms_norm_reference(x, weight, 1e-5), (x, weight), grad)
    for a, b in zip(ours, ref):
        assert_close(a, b, torch.float32, "grad")


def test_launcher_names_bad_arguments() -> None:
    with pytest.raises(ValueError, match="weight must have x's last dim 8"):
        rms_norm(torch.randn(2, 8), torch.ones(7), 1e-6)
    with pytest.raises(ValueError, match="x must be contiguous"):
        rms_norm(torch.randn(8, 2).t(), torch.ones(8), 1e-6)
