"""Grouped SwiGLU expert FFN (interpreted) against the per-expert torch loop, forward and backward."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import assert_close, interpret  # noqa: F401

from raymoe.kernels.grouped_ffn import BLOCK_M, grouped_swiglu, grouped_swiglu_reference, grouped_wgrad


def _weights(E: int, D: int, I: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.randn(E, 2 * I, D) * D**-0.5).to(dtype), (torch.randn(E, D, I) * I**-0.5).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "counts,D,I",
    [
        ([1], 24, 8),  # one row, one expert
        ([0, 5, 0, 17, 3, 0], 40, 24),  # experts with no rows, first and last among them
        ([BLOCK_M + 3, 0, 2], 72, 20),  # a group longer than one row tile
    ],
)
def test_forward_matches_reference(counts: list[int], D: int, I: int, dtype: torch.dtype) -> None:
    counts_t = torch.tensor(counts)
    w13, w2 = _weights(len(counts), D, I, dtype)
    x = torch.randn(int(counts_t.sum()), D).to(dtype)
    y = grouped_swiglu(x, counts_t, w13, w2)
    assert y.dtype == dtype
    # the reference in float32 from the same (rounded) inputs: the kernel accumulates in float32
    expected = grouped_swiglu_reference(x.float(), counts_t, w13.float(), w2.float())
    assert_close(y, expected, dtype, "forward")


def test_no_rows_at_all() -> None:
    w13, w2 = _weights(3, 16, 8, torch.float32)
    y = grouped_swiglu(torch.zeros(0, 16), torch.zeros(3, dtype=torch.int64), w13, w2)
    assert y.shape == (0, 16)


def test_gradients_match_reference() -> None:
    counts = torch.tensor([4, 0, 9, 1, 0])
    D, I = 36, 12
    w13, w2 = (w.requires_grad_() for w in _weights(len(counts), D, I, torch.float32))
    x = torch.randn(int(counts.sum()), D, requires_grad=True)
    grad_y = torch.randn(x.shape[0], D)
    ours = torch.autograd.grad(grouped_swiglu(x, counts, w13, w2), (x, w13, w2), grad_y)
    ref = torch.autograd.grad(grouped_swiglu_reference(x, counts, w13, w2), (x, w13, w2), grad_y)
    for name, a, b in zip(("x", "w13", "w2"), ours, ref):
        assert_close(a, b, torch.float32, f"grad {name}")
    assert ours[1][1].abs().max() == 0 and ours[2][4].abs().max() == 0  # experts without rows


def test_bf16_gradients_close_to_float32() -> None:
    counts = torch.tensor([3, 0, 6])
    D, I = 24, 10
    w13, w2 = _weights(3, D, I, torch.float32)
    x = torch.randn(9, D)
    grad_y = torch.randn(9, D)
    inputs32 = [t.clone().requires_grad_() for t in (x, w13, w2)]
    inputs16 = [t.to(torch.bfloat16).requires_grad_() for t in (x, w13, w2)]
    ref = torch.autograd.grad(grouped_swiglu_reference(inputs32[0], counts, *inputs32[1:]), inputs32, grad_y)
    ours = torch.autograd.grad(grouped_swiglu(inputs16[0], counts, *inputs16[1:]), inputs16, grad_y.to(torch.bfloat16))
    for name, a, b in zip(("x", "w13", "w2"), ours, ref):
        assert a.dtype == torch.bfloat16
        assert_close(a, b, torch.bfloat16, f"bf16 grad {name}")


def test_wgrad_per_expert() -> None:
    counts = torch.tensor([2, 0, 5])
    a, b = torch.randn(7, 9), torch.randn(7, 11)
    out = grouped_wgrad(a, b, counts, torch.float32)
    assert_close(out[0], a[:2].T @ b[:2], torch.float32)
    assert out[1].abs().max() == 0
    assert_close(out[2], a[2:].T @ b[2:], torch.float32)


def test_launcher_names_bad_arguments() -> None:
    w13, w2 = _weights(2, 16, 8, torch.float32)
    with pytest.raises(ValueError, match="x_sorted must have 16 columns"):
        grouped_swiglu(torch.randn(3, 15), torch.tensor([1, 2]), w13, w2)
    with pytest.raises(ValueError, match="w2 must have shape"):
        grouped_swiglu(torch.randn(3, 16), torch.tensor([1, 2]), w13, w2[:, :, :4])
    with pytest.raises(ValueError, match="counts must have one entry per expert"):
        grouped_swiglu(torch.randn(3, 16), torch.tensor([3]), w13, w2)
    with pytest.raises(ValueError, match="must share a dtype"):
        grouped_swiglu(torch.randn(3, 16).half(), torch.tensor([1, 2]), w13, w2)
