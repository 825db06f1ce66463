"""FP8 block quantization, dequantization and the block-scaled GEMM (interpreted) against torch."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import GPU, assert_close, interpret  # noqa: F401

from raymoe.kernels.fp8 import (
    FP8_BLOCK,
    FP8_DTYPE,
    FP8_E4M3_MAX,
    dequantize_weight,
    dequantize_weight_reference,
    fp8_gemm,
    fp8_gemm_reference,
    fp8_linear,
    fp8_linear_reference,
    quantize_activations,
    quantize_activations_reference,
    quantize_weight,
    quantize_weight_reference,
)

# Hopper's FP8 tensor cores add the products inside one 128-wide scale group with about 14 mantissa bits, not
# float32's 24 (DeepSeek-V3, section 3.3.2); the kernel, as the paper does, promotes to float32 once per group.
# On an H200 (2026-12-04) the float32 outputs were 7.7e-5 and 2.9e-4 (relative) from the float32 reference.
FP8_MMA_TOLERANCE = 2**-9


def _assert_fp8_product_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    if not GPU:
        assert_close(actual, expected, torch.float32, what)
        return
    err = (actual.float() - expected.float()).abs().max().item()
    bound = FP8_MMA_TOLERANCE * max(1.0, expected.float().abs().max().item())
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g} (FP8 tensor cores)"


def _as_float(t: torch.Tensor) -> torch.Tensor:
    return t.float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,K", [(1, 40), (7, 300), (20, 256)])
def test_activation_quantization_is_exact(M: int, K: int, dtype: torch.dtype) -> None:
    x = (torch.randn(M, K) * torch.logspace(-3, 2, K)).to(dtype)  # magnitudes over five decades
    x[-1, :FP8_BLOCK] = 0  # an all-zero group: scale floor, zeros, no NaN
    y, scale = quantize_activations(x)
    y_ref, scale_ref = quantize_activations_reference(x)
    assert y.dtype == FP8_DTYPE and scale.shape == (M, -(-K // FP8_BLOCK))
    assert torch.equal(scale, scale_ref)
    assert torch.equal(_as_float(y), _as_float(y_ref))  # same rounding as torch's cast, bit for bit
    assert not torch.isnan(_as_float(y)).any() and (_as_float(y)[-1, :FP8_BLOCK] == 0).all()
    if M > 1:  # each non-zero group's largest value maps to 448
        assert _as_float(y)[0, :FP8_BLOCK].abs().amax() == FP8_E4M3_MAX


def test_weight_quantization_round_trip() -> None:
    w = torch.randn(300, 140) * 0.02
    w_fp8, scale = quantize_weight(w)
    w_ref, scale_ref = quantize_weight_reference(w)
    assert scale.shape == (3, 2)
    assert torch.equal(scale, scale_ref)
    assert torch.equal(_as_float(w_fp8), _as_float(w_ref))
    back = dequantize_weight(w_fp8, scale, torch.float32)
    assert torch.equal(back, dequantize_weight_reference(w_fp8, scale, torch.float32))
    # e4m3 keeps 3 mantissa bits: relative error of a normal value at most 2^-4
    big = w.abs() > scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:300, :140] * 2**-6
    assert ((back - w).abs() <= w.abs() * 2**-4 + 1e-12)[big].all()


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,N,K", [(1, 50, 70), (33, 130, 260)])
def test_gemm_matches_reference(M: int, N: int, K: int, out_dtype: torch.dtype) -> None:
    x, w = torch.randn(M, K), torch.randn(N, K) * 0.05
    w_fp8, w_scale = quantize_weight_reference(w)
    a_fp8, a_scale = quantize_activations_reference(x)
    out = fp8_gemm(a_fp8, a_scale, w_fp8, w_scale, out_dtype)
    assert out.dtype == out_dtype
    want = fp8_gemm_reference(a_fp8, a_scale, w_fp8, w_scale, out_dtype)
    if out_dtype == torch.float32:
        _assert_fp8_product_close(out, want, "fp8 gemm")
    else:
        assert_close(out, want, out_dtype, "fp8 gemm")
    # and close to the unquantized product: two e4m3 roundings, each at most 2^-4 relative
    linear = fp8_linear(x, w_fp8, w_scale, torch.float32)
    _assert_fp8_product_close(linear, fp8_linear_reference(x, w_fp8, w_scale, torch.float32), "fp8 linear")
    assert (linear - x @ w.T).abs().max() < 0.1 * (x @ w.T).abs().max()


def test_launchers_name_bad_arguments() -> None:
    w_fp8, w_scale = quantize_weight_reference(torch.randn(130, 70))
    a_fp8, a_scale = quantize_activations_reference(torch.randn(4, 70))
    with pytest.raises(ValueError, match="scale_inv must be \\(2, 1\\)"):
        dequantize_weight(w_fp8, w_scale[:1])
    with pytest.raises(ValueError, match="a_scale must be \\(4, 1\\)"):
        fp8_gemm(a_fp8, a_scale[:2], w_fp8, w_scale)
    with pytest.raises(ValueError, match="w_fp8 must be one of"):
        fp8_gemm(a_fp8, a_scale, w_fp8.float(), w_scale)
