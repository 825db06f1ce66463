"""Weight-only quantization: round trips within their stated bounds, and the bytes the 671B plan counts."""

from __future__ import annotations

import pytest
import torch

from raymoe.platform.checkpoint.fp8 import dequantize_fp8_blockwise, quantize_fp8_blockwise
from raymoe.platform.checkpoint.quant import (
    QMAX,
    dequantize_groupwise,
    group_scales,
    quantize_groupwise,
    quantized_bytes,
)
from raymoe.platform.plan import expert_bytes


@pytest.mark.parametrize("dtype", ["int8", "int4"])
@pytest.mark.parametrize("shape,group", [((64, 256), 128), ((33, 77), 32), ((5, 3), 128)])
def test_round_trip_within_half_a_scale(dtype: str, shape: tuple[int, int], group: int) -> None:
    w = torch.randn(shape) * torch.logspace(-3, 1, shape[0]).unsqueeze(1)  # rows of very different size
    w[0, : min(group, shape[1])] = 0.0  # a group of zeros
    q, scales = quantize_groupwise(w, dtype, group)
    back = dequantize_groupwise(q, scales, dtype, shape[1], group)
    s = scales.float().repeat_interleave(group, dim=1)[:, : shape[1]]
    assert (back - w).abs().le(s / 2 * (1 + 1e-6)).all()
    assert back[0, : min(group, shape[1])].eq(0).all()
    # the scale is never below amax / qmax and at most one bf16 step above it
    amax = torch.nn.functional.pad(w.abs(), (0, -shape[1] % group)).view(shape[0], -1, group).amax(-1)
    exact = amax / QMAX[dtype]
    nonzero = amax > 0
    assert (scales.float()[nonzero] >= exact[nonzero]).all()
    assert (scales.float()[nonzero] <= exact[nonzero] * (1 + 2**-7)).all()
    assert scales.dtype == torch.bfloat16 and q.dtype == (torch.int8 if dtype == "int8" else torch.uint8)


def test_codes_by_hand() -> None:
    w = torch.tensor([[7.0, -7.0, 3.4, 0.0, 1.0]])  # one group of 5, amax 7
    q, s = quantize_groupwise(w, "int4", group_size=8)
    assert float(s) == 1.0
    # int4 codes 7, -7, 3, 0, 1 stored as q + 8 = 15, 1, 11, 8, 9 (+ a padding 8), low nibble first
    assert q.tolist() == [[15 | (1 << 4), 11 | (8 << 4), 9 | (8 << 4)]]
    assert dequantize_groupwise(q, s, "int4", 5, 8).tolist() == [[7.0, -7.0, 3.0, 0.0, 1.0]]
    q8, s8 = quantize_groupwise(torch.tensor([[127.0, -63.4, 0.6]]), "int8", 4)
    assert float(s8) == 1.0 and q8.tolist() == [[127, -63, 1]]


def test_fp8_block_round_trip_bound() -> None:
    w = torch.randn(256, 200)
    q, scale_inv = quantize_fp8_blockwise(w)
    back = dequantize_fp8_blockwise(q, scale_inv)
    # e4m3 keeps 3 mantissa bits: relative error at most 2^-4 of the value, plus subnormals near 0
    err = (back - w).abs()
    bound = w.abs() * 2**-4 + scale_inv.repeat_interleave(128, 0)[:256].repeat_interleave(128, 1)[:, :200] * 2**-9
    assert (err <= bound).all()


@pytest.mark.parametrize("dtype", ["int8", "int4", "fp8"])
def test_the_plan_counts_the_bytes_the_quantizer_holds(dtype: str) -> None:
    matrices = ((256, 64), (64, 128), (33, 77))  # gate_up, down, and an odd shape
    held = 0
    for rows, cols in matrices:
        w = torch.randn(rows, cols)
        if dtype == "fp8":
            held += quantized_bytes(*quantize_fp8_blockwise(w))
        else:
            held += quantized_bytes(*quantize_groupwise(w, dtype, 32))
    assert expert_bytes(matrices, dtype, group_size=32).total == held


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="dtype must be one of int8, int4, got 'int3'"):
        group_scales(torch.ones(2, 2), "int3")
    with pytest.raises(ValueError, match="group_size"):
        quantize_groupwise(torch.ones(2, 2), "int8", 0)
    with pytest.raises(ValueError, match="shape"):
        quantize_groupwise(torch.ones(2, 2, 2), "int8")
