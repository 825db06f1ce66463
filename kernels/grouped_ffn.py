"""Grouped expert FFN: SwiGLU ``down(silu(gate(x)) * up(x))`` over every expert's row group.

The rows of ``x_sorted`` [M, D] come grouped by expert (``counts[e]`` rows for expert e, in
order, as :func:`raymoe.kernels.moe_permute.moe_permute` leaves them). One launch per GEMM covers
all experts: a tile schedule (expert, first row) is built on the device from ``counts`` without
a host sync, sized by the bound ``cdiv(M, BLOCK_M) + E``; programs past the last tile return at
once. The first GEMM fuses SwiGLU (gate and up columns of ``gate_up_proj`` in one program) and
keeps the pre-activations for the backward. Backward: two grouped GEMMs for the input gradients,
two grouped weight-gradient GEMMs (each expert reduces over its own rows), SwiGLU's derivative in
torch (elementwise). Weights as the model stores them: ``w13`` [E, 2I, D], ``w2`` [E, D, I].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from raymoe.kernels._common import (
    FLOAT_DTYPES,
    check_same_device,
    check_tensor,
    dot_precision,
    launchable,
    upcast_bf16,
)

# Tiles: initial choices for bf16 on Hopper (128×128×64, 8 warps, 3 stages is the usual
# starting point of Triton's matmul tutorial); the SwiGLU GEMM keeps two accumulators, so its
# N tile is halved to hold the same registers. Not yet tuned on a GPU.
BLOCK_M = 128
BLOCK_N = 128
BLOCK_N_SWIGLU = 64
BLOCK_K = 64
NUM_WARPS = 8
NUM_STAGES = 3


@triton.jit
def _grouped_mm_kernel(
    a_ptr,  # [M, Kd] rows grouped by expert
    b_ptr,  # [E, N, Kd] through strides (a transposed view is fine)
    c_ptr,  # [M, N] (SWIGLU: [M, N/2], the activation)
    h_ptr,  # [M, N] pre-activations (written when SWIGLU)
    tile_expert_ptr,  # [T] expert of each row tile, -1 past the last
    tile_row_ptr,  # [T] first row of each row tile
    offs_ptr,  # [E + 1] first row of each expert's group
    N,
    Kd,
    stride_am,
    stride_be,
    stride_bn,
    stride_bk,
    SWIGLU: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    tile = tl.program_id(0)
    expert = tl.load(tile_expert_ptr + tile)
    if expert < 0:
        return
    row_end = tl.load(offs_ptr + expert + 1)
    rows = tl.load(tile_row_ptr + tile) + tl.arange(0, BM)
    row_ok = rows < row_end
    n_out = N // 2 if SWIGLU else N
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    col_ok = cols < n_out
    ks = tl.arange(0, BK)
    b_base = b_ptr + expert.to(tl.int64) * stride_be
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc_up = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, Kd, BK):
        k_ok = (k0 + ks) < Kd
        a = tl.load(
            a_ptr + rows[:, None] * stride_am + (k0 + ks)[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0
        )
        b_mask = k_ok[:, None] & col_ok[None, :]
        b = tl.load(b_base + (k0 + ks)[:, None] * stride_bk + cols[None, :] * stride_bn, mask=b_mask, other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if SWIGLU:
            up_cols = cols + n_out
            b_up = tl.load(
                b_base + (k0 + ks)[:, None] * stride_bk + up_cols[None, :] * stride_bn, mask=b_mask, other=0.0
            )
            if UPCAST:
                b_up = b_up.to(tl.float32)
            acc_up = tl.dot(a, b_up, acc_up, input_precision=PRECISION)
    out_mask = row_ok[:, None] & col_ok[None, :]
    if SWIGLU:
        # pre-activations rounded to the output dtype, as the torch path has them
        gate = acc.to(h_ptr.dtype.element_ty)
        up = acc_up.to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + rows[:, None] * N + cols[None, :], gate, mask=out_mask)
        tl.store(h_ptr + rows[:, None] * N + (cols + n_out)[None, :], up, mask=out_mask)
        g = gate.to(tl.float32)
        act = g * tl.sigmoid(g) * up.to(tl.float32)
        tl.store(c_ptr + rows[:, None] * n_out + cols[None, :], act.to(c_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(c_ptr + rows[:, None] * N + cols[None, :], acc.to(c_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _grouped_wgrad_kernel(
    a_ptr,  # [M, P] rows grouped by expert
    b_ptr,  # [M, Q]
    out_ptr,  # [E, P, Q] = per expert a_rowsᵀ @ b_rows
    offs_ptr,  # [E + 1]
    P,
    Q,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BP: tl.constexpr,
    BQ: tl.constexpr,
    BK: tl.constexpr,
):
    expert = tl.program_id(0)
    ps = tl.program_id(1) * BP + tl.arange(0, BP)
    qs = tl.program_id(2) * BQ + tl.arange(0, BQ)
    p_ok = ps < P
    q_ok = qs < Q
    start = tl.load(offs_ptr + expert)
    end = tl.load(offs_ptr + expert + 1)
    ks = tl.arange(0, BK)
    acc = tl.zeros((BP, BQ), dtype=tl.float32)
    for r0 in range(start, end, BK):
        r = r0 + ks
        r_ok = r < end
        a = tl.load(a_ptr + r[None, :] * P + ps[:, None], mask=p_ok[:, None] & r_ok[None, :], other=0.0)  # [BP, BK]
        b = tl.load(b_ptr + r[:, None] * Q + qs[None, :], mask=r_ok[:, None] & q_ok[None, :], other=0.0)  # [BK, BQ]
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    out = out_ptr + expert.to(tl.int64) * P * Q + ps[:, None] * Q + qs[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=p_ok[:, None] & q_ok[None, :])


def _schedule(t: torch.Tensor, tile_end: torch.Tensor, tiles: torch.Tensor, offs: torch.Tensor, block_m: int):  # noqa: ANN202
    E = tiles.numel()
    expert = torch.searchsorted(tile_end, t, right=True)  # [T]
    valid = expert < E
    e = expert.clamp(max=max(E - 1, 0))
    first_tile = tile_end[e] - tiles[e]
    row = offs[e] + (t - first_tile) * block_m
    return torch.where(valid, expert, -1), row, offs


def _tiles(counts: torch.Tensor, M: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """counts [E] -> (tile_expert [T], tile_row [T], offs [E + 1]), T = cdiv(M, block_m) + E, with no host sync.

    Tile t covers rows tile_row[t] .. +block_m of expert tile_expert[t] (-1: past the last tile)."""
    E = counts.numel()
    counts = counts.to(torch.int64)
    offs = torch.zeros(E + 1, dtype=torch.int64, device=counts.device)
    torch.cumsum(counts, 0, out=offs[1:])
    tiles = (counts + block_m - 1) // block_m
    t = torch.arange(triton.cdiv(M, block_m) + E, device=counts.device)
    return _schedule(t, tiles.cumsum(0), tiles, offs, block_m)


def grouped_mm(
    a: torch.Tensor, b: torch.Tensor, counts: torch.Tensor, *, swiglu: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per expert e: out[rows_e] = a[rows_e] @ b[e]ᵀ, a [M, Kd] grouped by ``counts`` [E], b [E, N, Kd] (any strides).

    With ``swiglu`` (N = 2I): returns (silu(gate) * up [M, I], pre-activations [M, 2I]); else (out [M, N], None)."""
    check_tensor("a", a, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("b", b, ndim=3, dtypes=FLOAT_DTYPES, contiguous=False)
    check_tensor("counts", counts, ndim=1, dtypes=(torch.int64, torch.int32))
    check_same_device(a=a, b=b, counts=counts)
    E, N, Kd = b.shape
    M = a.shape[0]
    if a.shape[1] != Kd:
        raise ValueError(f"a's columns ({a.shape[1]}) must equal b's last dim ({Kd})")
    if counts.numel() != E:
        raise ValueError(f"counts must have one entry per expert of b ({E}), got {counts.numel()}")
    if a.dtype != b.dtype:
        raise ValueError(f"a and b must share a dtype, got {a.dtype} and {b.dtype}")
    if swiglu and N % 2:
        raise ValueError(f"b's N ({N}) must be even (gate and up halves) for swiglu")
    n_out = N // 2 if swiglu else N
    out = a.new_empty(M, n_out)
    h = a.new_empty(M, N) if swiglu else None
    if M == 0:
        return out, h
    tile_expert, tile_row, offs = _tiles(counts, M, BLOCK_M)
    bn = BLOCK_N_SWIGLU if swiglu else BLOCK_N
    grid = (tile_expert.numel(), triton.cdiv(n_out, bn))
    launchable(_grouped_mm_kernel, a)[grid](
        a, b, out, h if swiglu else out, tile_expert, tile_row, offs, N, Kd,
        a.stride(0), b.stride(0), b.stride(1), b.stride(2),
        SWIGLU=swiglu, UPCAST=upcast_bf16(a), PRECISION=dot_precision(a), BM=BLOCK_M, BN=bn, BK=BLOCK_K,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )  # fmt: skip
    return out, h


def grouped_wgrad(a: torch.Tensor, b: torch.Tensor, counts: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Per expert e: out[e] = a[rows_e]ᵀ @ b[rows_e]; a [M, P], b [M, Q] -> [E, P, Q] (zeros for empty experts)."""
    check_tensor("a", a, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("b", b, ndim=2, dtypes=FLOAT_DTYPES)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"a and b must have the same rows, got {a.shape[0]} and {b.shape[0]}")
    E, P, Q = counts.numel(), a.shape[1], b.shape[1]
    offs = torch.zeros(E + 1, dtype=torch.int64, device=counts.device)
    torch.cumsum(counts.to(torch.int64), 0, out=offs[1:])
    out = a.new_empty(E, P, Q, dtype=out_dtype)
    grid = (E, triton.cdiv(P, BLOCK_N), triton.cdiv(Q, BLOCK_N))
    launchable(_grouped_wgrad_kernel, a)[grid](
        a, b, out, offs, P, Q, UPCAST=upcast_bf16(a, b), PRECISION=dot_precision(a, b),
        BP=BLOCK_N, BQ=BLOCK_N, BK=BLOCK_K, num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )  # fmt: skip
    return out


class GroupedSwiGLU(torch.autograd.Function):
    """Autograd of :func:`grouped_swiglu`; saves x, the pre-activations and the counts."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, counts: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        act, h = grouped_mm(x, w13, counts, swiglu=True)  # [M, I], [M, 2I]
        y, _ = grouped_mm(act, w2, counts)  # [M, D]
        ctx.save_for_backward(x, counts, w13, w2, h)
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):  # noqa: ANN001, ANN205
        x, counts, w13, w2, h = ctx.saved_tensors
        grad_y = grad_y.contiguous().to(x.dtype)
        gate, up = h.float().chunk(2, dim=-1)
        sig = torch.sigmoid(gate)
        silu = gate * sig
        act = (silu * up).to(x.dtype)
        grad_act, _ = grouped_mm(grad_y, w2.transpose(1, 2), counts)  # [M, I]
        grad_act = grad_act.float()
        grad_gate = grad_act * up * sig * (1 + gate * (1 - sig))
        grad_h = torch.cat((grad_gate, grad_act * silu), dim=-1).to(x.dtype)  # [M, 2I]
        grad_x, _ = grouped_mm(grad_h, w13.transpose(1, 2), counts)  # [M, D]
        grad_w13 = grouped_wgrad(grad_h, x, counts, w13.dtype) if ctx.needs_input_grad[2] else None
        grad_w2 = grouped_wgrad(grad_y, act, counts, w2.dtype) if ctx.needs_input_grad[3] else None
        return grad_x, None, grad_w13, grad_w2


def grouped_swiglu(x_sorted: torch.Tensor, counts: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Triton: x_sorted [M, D] (counts[e] rows per expert, in order), w13 [E, 2I, D], w2 [E, D, I] -> [M, D].

    Differentiable in x_sorted, w13 and w2; float32 accumulation, output in x's dtype."""
    check_tensor("x_sorted", x_sorted, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("w13", w13, ndim=3, dtypes=FLOAT_DTYPES, contiguous=False)
    check_tensor("w2", w2, ndim=3, dtypes=FLOAT_DTYPES, contiguous=False)
    E, two_i, D = w13.shape
    if w2.shape != (E, D, two_i // 2):
        raise ValueError(
            f"w2 must have shape {(E, D, two_i // 2)} to match w13 {tuple(w13.shape)}, got {tuple(w2.shape)}"
        )
    if x_sorted.shape[1] != D:
        raise ValueError(f"x_sorted must have {D} columns (w13's last dim), got {x_sorted.shape[1]}")
    return GroupedSwiGLU.apply(x_sorted, counts, w13, w2)


def grouped_swiglu_reference(
    x_sorted: torch.Tensor, counts: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    """Torch reference of :func:`grouped_swiglu`: a loop over experts (the model's float path)."""
    outs = []
    for e, rows in enumerate(x_sorted.split(counts.tolist())):
        if rows.shape[0]:
            gate, up = torch.nn.functional.linear(rows, w13[e]).chunk(2, dim=-1)
            outs.append(torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, w2[e]))
    return torch.cat(outs) if outs else x_sorted.new_zeros(x_sorted.shape)
