"""MoE token permutation: token rows sorted by expert into contiguous groups, and back.

``moe_permute`` gathers each (token, choice) pair's row so that the rows of expert 0 come first,
then expert 1, ... (``counts[e]`` rows each; a stable sort keeps token order inside a group).
``moe_unpermute`` sums each token's K expert outputs weighted by its gate weights. Both are
gathers (the inverse permutation is computed once), so neither needs atomics and both are
deterministic. Shapes: N tokens, K choices per token, D hidden, E experts, M = N·K rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from raymoe.kernels._common import FLOAT_DTYPES, check_same_device, check_tensor, launchable, upcast_bf16

# Tile of one program: BLOCK_ROWS rows × BLOCK_COLS columns. Initial choice (a 7168-wide bf16 row
# is 14 KiB: 8 rows × 1024 columns move 16 KiB per program); not yet tuned on a GPU.
BLOCK_ROWS = 8
BLOCK_COLS = 1024


@triton.jit
def _gather_rows_kernel(
    x_ptr,  # [N, D]
    src_ptr,  # [M] int64: the row of x each output row copies
    scale_ptr,  # [M] float32 (read when HAS_SCALE)
    out_ptr,  # [M, D]
    M,
    D,
    HAS_SCALE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols[None, :] < D)
    src = tl.load(src_ptr + rows, mask=row_ok, other=0)
    vals = tl.load(x_ptr + src[:, None] * D + cols[None, :], mask=mask, other=0.0)
    if HAS_SCALE:
        scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0)
        vals = (vals.to(tl.float32) * scale[:, None]).to(out_ptr.dtype.element_ty)
    elif UPCAST:
        vals = vals.to(tl.float32).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None] * D + cols[None, :], vals, mask=mask)


@triton.jit
def _combine_kernel(
    y_ptr,  # [M, D] expert outputs in sorted order
    pos_ptr,  # [N, K] int64: the sorted row of each (token, choice)
    w_ptr,  # [N, K] float32 gate weights (read when HAS_WEIGHTS, else 1)
    out_ptr,  # [N, D]
    N,
    D,
    K: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    tok_ok = tokens < N
    mask = tok_ok[:, None] & (cols[None, :] < D)
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for k in range(K):
        pos = tl.load(pos_ptr + tokens * K + k, mask=tok_ok, other=0)
        y = tl.load(y_ptr + pos[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_WEIGHTS:
            w = tl.load(w_ptr + tokens * K + k, mask=tok_ok, other=0.0)
            y = y * w[:, None]
        acc += y
    tl.store(out_ptr + tokens[:, None] * D + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def gather_rows(x: torch.Tensor, src: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """out[i] = x[src[i]] (× scale[i]): x [N, D] contiguous, src [M] int64, scale [M] float32 -> [M, D]."""
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("src", src, ndim=1, dtypes=(torch.int64,))
    if scale is not None:
        check_tensor("scale", scale, ndim=1, dtypes=(torch.float32,))
        if scale.shape[0] != src.shape[0]:
            raise ValueError(f"scale must have {src.shape[0]} entries (one per row of src), got {scale.shape[0]}")
    check_same_device(x=x, src=src)
    M, D = src.shape[0], x.shape[1]
    out = x.new_empty(M, D)
    if M == 0 or D == 0:
        return out
    grid = (triton.cdiv(M, BLOCK_ROWS), triton.cdiv(D, BLOCK_COLS))
    launchable(_gather_rows_kernel, x)[grid](
        x, src, scale if scale is not None else src, out, M, D,
        HAS_SCALE=scale is not None, UPCAST=upcast_bf16(x), BLOCK_M=BLOCK_ROWS, BLOCK_D=BLOCK_COLS,
    )  # fmt: skip
    return out


def combine_rows(
    y: torch.Tensor, pos: torch.Tensor, weights: torch.Tensor | None, out_dtype: torch.dtype
) -> torch.Tensor:
    """out[n] = Σ_k weights[n, k] · y[pos[n, k]] in float32: y [M, D], pos [N, K] int64, weights [N, K] float32."""
    check_tensor("y", y, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("pos", pos, ndim=2, dtypes=(torch.int64,))
    if weights is not None:
        check_tensor("weights", weights, ndim=2, dtypes=(torch.float32,))
        if weights.shape != pos.shape:
            raise ValueError(f"weights must have pos's shape {tuple(pos.shape)}, got {tuple(weights.shape)}")
    check_same_device(y=y, pos=pos)
    (N, K), D = pos.shape, y.shape[1]
    out = y.new_empty(N, D, dtype=out_dtype)
    if N == 0 or D == 0:
        return out
    grid = (triton.cdiv(N, BLOCK_ROWS), triton.cdiv(D, BLOCK_COLS))
    launchable(_combine_kernel, y)[grid](
        y, pos, weights if weights is not None else y, out, N, D, K=K,
        HAS_WEIGHTS=weights is not None, BLOCK_N=BLOCK_ROWS, BLOCK_D=BLOCK_COLS,
    )  # fmt: skip
    return out


def sort_by_expert(idx: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """idx [N, K] expert ids -> (order [N·K]: the (token, choice) pairs grouped by expert, counts [E])."""
    check_tensor("idx", idx, ndim=2, dtypes=(torch.int64, torch.int32), contiguous=False)
    flat = idx.reshape(-1)
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=n_experts)
    if counts.numel() != n_experts:
        raise ValueError(f"idx holds expert ids up to {counts.numel() - 1}, but n_experts is {n_experts}")
    return order, counts


def _inverse(order: torch.Tensor) -> torch.Tensor:
    pos = torch.empty_like(order)
    pos[order] = torch.arange(order.numel(), device=order.device)
    return pos


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, K: int) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(order)
        ctx.K = K
        return gather_rows(x, order // K)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        (order,) = ctx.saved_tensors
        pos = _inverse(order).view(-1, ctx.K)
        return combine_rows(grad.contiguous(), pos, None, grad.dtype), None, None


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, y: torch.Tensor, order: torch.Tensor, weights: torch.Tensor, out_dtype: torch.dtype
    ) -> torch.Tensor:  # noqa: ANN001
        pos = _inverse(order).view(weights.shape)
        ctx.save_for_backward(y, order, pos, weights)
        return combine_rows(y, pos, weights.float().contiguous(), out_dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        y, order, pos, weights = ctx.saved_tensors
        grad = grad.contiguous()
        K = weights.shape[1]
        grad_y = grad_w = None
        if ctx.needs_input_grad[0]:
            scale = weights.float().reshape(-1).index_select(0, order)
            grad_y = gather_rows(grad, order // K, scale).to(y.dtype)
        if ctx.needs_input_grad[2]:
            rows = y.index_select(0, pos.reshape(-1)).view(*weights.shape, -1).float()  # [N, K, D]
            grad_w = (rows * grad.float().unsqueeze(1)).sum(-1).to(weights.dtype)
        return grad_y, None, grad_w, None


def moe_permute(x: torch.Tensor, idx: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton: x [N, D], idx [N, K] -> (x_sorted [N·K, D], counts [E], order [N·K]); differentiable in x."""
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("idx", idx, ndim=2, dtypes=(torch.int64, torch.int32), contiguous=False)
    if idx.shape[0] != x.shape[0]:
        raise ValueError(f"idx must have one row per token of x ({x.shape[0]}), got {idx.shape[0]}")
    order, counts = sort_by_expert(idx, n_experts)
    return _Permute.apply(x, order, idx.shape[1]), counts, order


def moe_unpermute(
    y_sorted: torch.Tensor, order: torch.Tensor, weights: torch.Tensor, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Triton: y_sorted [N·K, D], order [N·K], weights [N, K] -> Σ_k weights[n, k] · y(n, k)  [N, D].

    Accumulates in float32; differentiable in y_sorted and weights."""
    check_tensor("y_sorted", y_sorted, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("order", order, ndim=1, dtypes=(torch.int64,))
    check_tensor("weights", weights, ndim=2, dtypes=FLOAT_DTYPES, contiguous=False)
    if not (y_sorted.shape[0] == order.shape[0] == weights.numel()):
        raise ValueError(
            f"y_sorted rows ({y_sorted.shape[0]}), order ({order.shape[0]}) and weights' N·K ({weights.numel()}) "
            "must be equal"
        )
    return _Unpermute.apply(y_sorted, order, weights, out_dtype or y_sorted.dtype)


def moe_permute_reference(
    x: torch.Tensor, idx: torch.Tensor, n_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch reference of :func:`moe_permute`."""
    order, counts = sort_by_expert(idx, n_experts)
    return x.index_select(0, order // idx.shape[1]), counts, order


def moe_unpermute_reference(
    y_sorted: torch.Tensor, order: torch.Tensor, weights: torch.Tensor, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Torch reference of :func:`moe_unpermute` (the model's index_add, accumulated in float32)."""
    N, K = weights.shape
    y = y_sorted.float() * weights.float().reshape(-1)[order].unsqueeze(-1)
    out = torch.zeros(N, y_sorted.shape[1], dtype=torch.float32, device=y_sorted.device)
    return out.index_add_(0, order // K, y).to(out_dtype or y_sorted.dtype)
