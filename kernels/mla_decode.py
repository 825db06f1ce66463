"""Absorbed-MLA decode attention over a paged latent cache (one new token per sequence).

Every query head attends to the same cached latent: per token, ``c_kv`` [C] (normalized, the
values and, through the absorbed query, the keys) and the rotated ``k_pe`` [R], stored side by side
in ``cache`` [num_blocks, block_size, C + R]. With ``q_lat`` the query already multiplied by the key
half of ``kv_b_proj``: out[b, h] = softmax(scale · (q_lat·c_kvᵀ + q_pe·k_peᵀ)) · c_kv over the
first ``seq_lens[b]`` tokens, whose cache rows are found through ``block_table``. As FlashMLA does,
one program holds a block of heads, so each latent tile loaded serves all of them; long contexts
are split across programs (flash-decoding) and the splits merged by their log-sum-exp.
Shapes: B batch, H heads, C kv_lora_rank, R qk_rope_head_dim, S splits.
"""

from __future__ import annotations

import math

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

LOG2_E = math.log2(math.e)  # softmax in base 2: exp(x) = exp2(x · log2 e)

# Heads per program and tokens per step. A [32, 512] float32 accumulator is 64 registers a thread
# at 8 warps, and a [64, 576] bf16 latent tile is 72 KiB of shared memory: initial choices for
# C = 512 on Hopper, not yet tuned on a GPU.
BLOCK_H = 32
BLOCK_N = 64
NUM_WARPS = 8
# Split a sequence across programs until the grid holds this many programs per SM (decode of a
# small batch would otherwise leave SMs idle), but never below MIN_SPLIT_TOKENS tokens a split.
PROGRAMS_PER_SM = 2
MIN_SPLIT_TOKENS = 256


@triton.jit
def _mla_decode_kernel(
    q_lat_ptr,  # [B, H, C]
    q_pe_ptr,  # [B, H, R]
    cache_ptr,  # [num_blocks, block_size, C + R]
    block_table_ptr,  # [B, max_blocks] int32
    seq_lens_ptr,  # [B] int32
    out_ptr,  # [B, H, C] (one split) or [B, H, S, C] float32 partials
    lse_ptr,  # [B, H, S] float32 base-2 log-sum-exp of each split (when SPLIT)
    H,
    C,
    R,
    block_size,
    max_blocks,
    split_tokens,
    scale_log2,
    SPLIT: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BH: tl.constexpr,
    BN: tl.constexpr,
    BC: tl.constexpr,
    BR: tl.constexpr,
):
    head_block = tl.program_id(0)  # fastest: the head blocks of one (sequence, split) share its latent in L2
    split = tl.program_id(1)
    b = tl.program_id(2)
    n_splits = tl.num_programs(1)
    heads = head_block * BH + tl.arange(0, BH)
    cs = tl.arange(0, BC)
    rs = tl.arange(0, BR)
    h_ok = heads < H
    c_ok = cs < C
    r_ok = rs < R
    q_rows = b.to(tl.int64) * H + heads
    q_lat = tl.load(q_lat_ptr + q_rows[:, None] * C + cs[None, :], mask=h_ok[:, None] & c_ok[None, :], other=0.0)
    q_pe = tl.load(q_pe_ptr + q_rows[:, None] * R + rs[None, :], mask=h_ok[:, None] & r_ok[None, :], other=0.0)
    if UPCAST:
        q_lat = q_lat.to(tl.float32)
        q_pe = q_pe.to(tl.float32)

    seq_len = tl.load(seq_lens_ptr + b)
    start = split * split_tokens
    end = tl.minimum(start + split_tokens, seq_len)
    width = C + R
    m = tl.full((BH,), float("-inf"), tl.float32)
    l = tl.zeros((BH,), tl.float32)
    acc = tl.zeros((BH, BC), tl.float32)
    for t0 in range(start, end, BN):
        ts = t0 + tl.arange(0, BN)
        t_ok = ts < end
        page = tl.load(block_table_ptr + b.to(tl.int64) * max_blocks + ts // block_size, mask=t_ok, other=0)
        rows = page.to(tl.int64) * block_size + ts % block_size
        kv = tl.load(cache_ptr + rows[:, None] * width + cs[None, :], mask=t_ok[:, None] & c_ok[None, :], other=0.0)
        k_pe = tl.load(
            cache_ptr + rows[:, None] * width + C + rs[None, :], mask=t_ok[:, None] & r_ok[None, :], other=0.0
        )
        if UPCAST:
            kv = kv.to(tl.float32)
            k_pe = k_pe.to(tl.float32)
        scores = tl.dot(q_lat, tl.trans(kv), input_precision=PRECISION) + tl.dot(
            q_pe, tl.trans(k_pe), input_precision=PRECISION
        )  # [BH, BN] float32
        scores = tl.where(t_ok[None, :], scores * scale_log2, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(kv.dtype), kv, input_precision=PRECISION)
        m = m_new

    has_tokens = l > 0
    out = acc / tl.where(has_tokens, l, 1.0)[:, None]
    out_mask = h_ok[:, None] & c_ok[None, :]
    if SPLIT:
        part = (q_rows * n_splits + split)[:, None] * C + cs[None, :]
        tl.store(out_ptr + part, out, mask=out_mask)
        lse = tl.where(has_tokens, m + tl.log2(tl.where(has_tokens, l, 1.0)), float("-inf"))
        tl.store(lse_ptr + q_rows * n_splits + split, lse, mask=h_ok)
    else:
        tl.store(out_ptr + q_rows[:, None] * C + cs[None, :], out.to(out_ptr.dtype.element_ty), mask=out_mask)


def _check(
    q_lat: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor
) -> None:
    check_tensor("q_lat", q_lat, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("q_pe", q_pe, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("cache", cache, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("block_table", block_table, ndim=2, dtypes=(torch.int32,))
    check_tensor("seq_lens", seq_lens, ndim=1, dtypes=(torch.int32,))
    check_same_device(q_lat=q_lat, q_pe=q_pe, cache=cache, block_table=block_table, seq_lens=seq_lens)
    B, H, C = q_lat.shape
    if q_pe.shape[:2] != (B, H):
        raise ValueError(f"q_pe must be [B={B}, H={H}, R], got {tuple(q_pe.shape)}")
    if cache.shape[2] != C + q_pe.shape[2]:
        raise ValueError(f"cache's last dim must be C + R = {C} + {q_pe.shape[2]}, got {cache.shape[2]}")
    if block_table.shape[0] != B or seq_lens.shape[0] != B:
        raise ValueError(
            f"block_table and seq_lens must have B={B} rows, got {tuple(block_table.shape)} and {tuple(seq_lens.shape)}"
        )
    if q_pe.dtype != q_lat.dtype:
        raise ValueError(f"q_pe must have q_lat's dtype {q_lat.dtype}, got {q_pe.dtype}")


def default_num_splits(batch: int, heads: int, max_context: int, device: torch.device) -> int:
    """Splits per sequence: enough programs for PROGRAMS_PER_SM on every SM, MIN_SPLIT_TOKENS at least each."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    programs = batch * triton.cdiv(heads, BLOCK_H)
    wanted = triton.cdiv(PROGRAMS_PER_SM * sms, programs)
    return max(1, min(wanted, triton.cdiv(max_context, MIN_SPLIT_TOKENS)))


def mla_decode(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    softmax_scale: float,
    *,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Triton: q_lat [B, H, C], q_pe [B, H, R], cache [num_blocks, block_size, C + R], block_table [B, max_blocks]
    int32, seq_lens [B] int32 (each >= 1) -> out [B, H, C] in q's dtype (float32 accumulation).

    ``num_splits`` (default: :func:`default_num_splits`) divides each sequence across programs."""
    _check(q_lat, q_pe, cache, block_table, seq_lens)
    B, H, C = q_lat.shape
    R = q_pe.shape[2]
    block_size = cache.shape[1]
    max_context = block_table.shape[1] * block_size
    if num_splits is None:
        num_splits = default_num_splits(B, H, max_context, q_lat.device)
    split_tokens = triton.cdiv(triton.cdiv(max_context, num_splits), BLOCK_N) * BLOCK_N
    num_splits = triton.cdiv(max_context, split_tokens)
    split = num_splits > 1
    out = torch.empty_like(q_lat)
    if split:
        partial = torch.empty(B, H, num_splits, C, dtype=torch.float32, device=q_lat.device)
        lse = torch.empty(B, H, num_splits, dtype=torch.float32, device=q_lat.device)
    grid = (triton.cdiv(H, BLOCK_H), num_splits, B)
    launchable(_mla_decode_kernel, q_lat)[grid](
        q_lat, q_pe, cache, block_table, seq_lens, partial if split else out, lse if split else out,
        H, C, R, block_size, block_table.shape[1], split_tokens, softmax_scale * LOG2_E,
        SPLIT=split, UPCAST=upcast_bf16(q_lat, cache), PRECISION=dot_precision(q_lat, cache), BH=BLOCK_H, BN=BLOCK_N,
        BC=max(16, triton.next_power_of_2(C)), BR=max(16, triton.next_power_of_2(R)), num_warps=NUM_WARPS,
    )  # fmt: skip
    if not split:
        return out
    # merge the splits by their log-sum-exp (empty splits have lse = -inf and weigh 0)
    weights = torch.exp2(lse - lse.amax(dim=-1, keepdim=True))  # [B, H, S]
    merged = (partial * weights.unsqueeze(-1)).sum(dim=2) / weights.sum(dim=-1, keepdim=True)
    return merged.to(q_lat.dtype)


def mla_decode_reference(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    softmax_scale: float,
) -> torch.Tensor:
    """Torch reference of :func:`mla_decode`: gather each sequence's cache rows, masked softmax, float32."""
    _check(q_lat, q_pe, cache, block_table, seq_lens)
    B, H, C = q_lat.shape
    block_size = cache.shape[1]
    T = block_table.shape[1] * block_size
    t = torch.arange(T, device=cache.device)
    valid = t[None, :] < seq_lens[:, None].long()  # [B, T]
    pages = block_table.long()[:, t // block_size].clamp(0, cache.shape[0] - 1)  # unused table slots may hold anything
    rows = torch.where(valid, pages * block_size + t % block_size, 0)
    kv = cache.reshape(-1, cache.shape[2])[rows].float()  # [B, T, C + R]
    c_kv, k_pe = kv[..., :C], kv[..., C:]
    scores = torch.bmm(q_lat.float(), c_kv.transpose(1, 2)) + torch.bmm(q_pe.float(), k_pe.transpose(1, 2))
    scores = (scores * softmax_scale).masked_fill(~valid[:, None, :], float("-inf"))  # [B, H, T]
    return torch.bmm(scores.softmax(dim=-1), c_kv).to(q_lat.dtype)
