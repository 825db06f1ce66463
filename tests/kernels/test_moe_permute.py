"""MoE permute/unpermute kernels (interpreted) against the torch reference, gradients included."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import assert_close, interpret  # noqa: F401

from raymoe.kernels.moe_permute import (
    moe_permute,
    moe_permute_reference,
    moe_unpermute,
    moe_unpermute_reference,
)


def _routing(N: int, K: int, E: int, empty: tuple[int, ...] = ()) -> torch.Tensor:
    allowed = torch.tensor([e for e in range(E) if e not in empty])
    return torch.stack([allowed[torch.randperm(len(allowed))[:K]] for _ in range(N)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("N,K,E,D", [(1, 2, 5, 33), (13, 3, 7, 40), (37, 2, 9, 1030)])
def test_permute_unpermute_match_reference(N: int, K: int, E: int, D: int, dtype: torch.dtype) -> None:
    x = torch.randn(N, D).to(dtype)
    idx = _routing(N, K, E, empty=(0, E - 2))
    weights = torch.rand(N, K)
    xs, counts, order = moe_permute(x, idx, E)
    xr, counts_r, order_r = moe_permute_reference(x, idx, E)
    assert torch.equal(counts, counts_r) and counts[0] == 0 and counts[E - 2] == 0
    assert torch.equal(xs, xr)  # a copy: exact in every dtype
    y = (xs.float() * 1.5 - 0.25).to(dtype)  # stand-in for the experts
    out = moe_unpermute(y, order, weights)
    assert out.dtype == dtype
    expected = moe_unpermute_reference(y, order_r, weights)
    assert_close(out, expected, dtype, "unpermute")
    # and the reference itself is right: sum_k w * (1.5 x - 0.25)
    direct = (weights[..., None] * (x.float()[:, None] * 1.5 - 0.25)).sum(1)
    assert_close(expected, direct, dtype, "reference")


def test_gradients_match_reference() -> None:
    N, K, E, D = 11, 3, 6, 24
    idx = _routing(N, K, E, empty=(3,))
    x = torch.randn(N, D, requires_grad=True)
    weights = torch.rand(N, K, requires_grad=True)
    w_lin = torch.randn(D, D)

    def run(permute, unpermute):  # noqa: ANN001, ANN202
        xs, _, order = permute(x, idx, E)
        return unpermute(torch.tanh(xs @ w_lin), order, weights)

    grad_out = torch.randn(N, D)
    ours = torch.autograd.grad(run(moe_permute, moe_unpermute), (x, weights), grad_out)
    ref = torch.autograd.grad(run(moe_permute_reference, moe_unpermute_reference), (x, weights), grad_out)
    for name, a, b in zip(("x", "weights"), ours, ref):
        assert_close(a, b, torch.float32, f"grad {name}")


def test_launcher_names_bad_arguments() -> None:
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="idx must have one row per token"):
        moe_permute(x, torch.zeros(3, 2, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match="x must be contiguous"):
        moe_permute(torch.randn(8, 4).t(), torch.zeros(4, 2, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match="n_experts is 2"):
        moe_permute(x, torch.full((4, 2), 3, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="weights' N·K"):
        moe_unpermute(torch.randn(8, 8), torch.arange(8), torch.rand(3, 2))
