"""DeepSeek-V3's FP8 (e4m3) block quantization and the GEMM with block scales.

Activations are quantized per token in groups of ``FP8_BLOCK`` = 128 columns, weights in
128 × 128 blocks; each group or block has a float32 scale = amax / ``FP8_E4M3_MAX`` (448, the
largest e4m3 value), and values are stored as ``x / scale`` rounded to e4m3. Dequantize by
multiplying back (the checkpoints' ``weight_scale_inv`` [⌈N/128⌉, ⌈K/128⌉] is this scale; edge
blocks are partial). ``fp8_gemm`` computes a @ wᵀ from the FP8 operands, applying the scales of
each 128-wide K block to the float32 partial product, as DeepSeek-V3's own kernel does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from raymoe.kernels._common import FLOAT_DTYPES, check_same_device, check_tensor, interpreting, launchable

FP8_E4M3_MAX = 448.0  # largest finite float8_e4m3fn value
FP8_BLOCK = 128  # activation groups 1×128, weight blocks 128×128 (DeepSeek-V3's weight_block_size)
FP8_DTYPE = torch.float8_e4m3fn
# amax floor: an all-zero group gets a tiny scale (and zeros) instead of 0/0 = NaN
FP8_AMAX_MIN = 1e-12
FP8_MIN_NORMAL_EXP = -6  # e4m3: 2^-6 is the smallest normal; below it the step is 2^-9
FP8_MANTISSA_BITS = 3

# the same numbers as constexpr globals, the only globals a compiled @triton.jit function may read
_E4M3_MAX = tl.constexpr(FP8_E4M3_MAX)
_AMAX_MIN = tl.constexpr(FP8_AMAX_MIN)
_MIN_NORMAL = tl.constexpr(2.0**FP8_MIN_NORMAL_EXP)
_MANTISSA_BITS = tl.constexpr(FP8_MANTISSA_BITS)

# GEMM tiles: BLOCK_K must equal FP8_BLOCK (one scale per K step) and BLOCK_N must equal it too
# (one weight scale per program); BLOCK_M 128 with 8 warps, 3 stages: 96 KiB of shared memory.
# Initial choices, not yet tuned on a GPU.
GEMM_BLOCK_M = 128
GEMM_NUM_WARPS = 8
GEMM_NUM_STAGES = 3
# rows of an activation quantization program (each row one 128-wide group)
QUANT_BLOCK_ROWS = 16


@triton.jit
def _to_e4m3(v, EXACT_ROUND: tl.constexpr):
    # Triton 3.9's interpreter converts float32 -> e4m3 wrongly when rounding carries into the
    # exponent (124.07 became 64, not 128); exactly representable values convert right, so under
    # the interpreter round to the e4m3 grid first (nearest, ties to even), as the GPU's cvt does.
    if EXACT_ROUND:
        a = tl.abs(v)
        exponent = tl.floor(tl.log2(tl.maximum(a, _MIN_NORMAL)))
        step = tl.exp2(exponent - _MANTISSA_BITS)
        t = a / step
        r = tl.floor(t + 0.5)
        r = tl.where((r - t == 0.5) & (r % 2 == 1), r - 1, r)
        v = tl.where(v < 0, -r * step, r * step)
    return v.to(tl.float8e4nv)


@triton.jit
def _act_quant_kernel(
    x_ptr, y_ptr, s_ptr, M, K, n_groups, EXACT_ROUND: tl.constexpr, BM: tl.constexpr, G: tl.constexpr
):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    group = tl.program_id(1)
    cols = group * G + tl.arange(0, G)
    mask = (rows < M)[:, None] & (cols < K)[None, :]
    offsets = rows.to(tl.int64)[:, None] * K + cols[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=1), _AMAX_MIN) / _E4M3_MAX  # [BM]
    tl.store(y_ptr + offsets, _to_e4m3(x / scale[:, None], EXACT_ROUND), mask=mask)
    tl.store(s_ptr + rows * n_groups + group, scale, mask=rows < M)


@triton.jit
def _weight_quant_kernel(w_ptr, y_ptr, s_ptr, N, K, EXACT_ROUND: tl.constexpr, G: tl.constexpr):
    rows = tl.program_id(0) * G + tl.arange(0, G)
    cols = tl.program_id(1) * G + tl.arange(0, G)
    mask = (rows < N)[:, None] & (cols < K)[None, :]
    offsets = rows.to(tl.int64)[:, None] * K + cols[None, :]
    w = tl.load(w_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(w)), _AMAX_MIN) / _E4M3_MAX
    tl.store(y_ptr + offsets, _to_e4m3(w / scale, EXACT_ROUND), mask=mask)
    tl.store(s_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1), scale)


@triton.jit
def _weight_dequant_kernel(y_ptr, s_ptr, out_ptr, N, K, G: tl.constexpr):
    rows = tl.program_id(0) * G + tl.arange(0, G)
    cols = tl.program_id(1) * G + tl.arange(0, G)
    mask = (rows < N)[:, None] & (cols < K)[None, :]
    offsets = rows.to(tl.int64)[:, None] * K + cols[None, :]
    scale = tl.load(s_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1))
    w = tl.load(y_ptr + offsets, mask=mask, other=0.0).to(tl.float32) * scale
    tl.store(out_ptr + offsets, w.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fp8_gemm_kernel(
    a_ptr,  # [M, K] e4m3
    a_s_ptr,  # [M, Kb] float32
    b_ptr,  # [N, K] e4m3
    b_s_ptr,  # [Nb, Kb] float32
    c_ptr,  # [M, N]
    M,
    N,
    K,
    n_kb,
    BM: tl.constexpr,
    G: tl.constexpr,
):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    n_block = tl.program_id(1)
    cols = n_block * G + tl.arange(0, G)
    ks = tl.arange(0, G)
    row_ok = rows < M
    col_ok = cols < N
    acc = tl.zeros((BM, G), dtype=tl.float32)
    for kb in range(0, n_kb):
        k_ok = (kb * G + ks) < K
        a = tl.load(
            a_ptr + rows.to(tl.int64)[:, None] * K + (kb * G + ks)[None, :],
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        b = tl.load(
            b_ptr + cols.to(tl.int64)[:, None] * K + (kb * G + ks)[None, :],
            mask=col_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        a_s = tl.load(a_s_ptr + rows * n_kb + kb, mask=row_ok, other=0.0)
        b_s = tl.load(b_s_ptr + n_block * n_kb + kb)
        acc += tl.dot(a, tl.trans(b)) * (a_s[:, None] * b_s)
    out = c_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :]
    tl.store(out, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton: x [M, K] -> (e4m3 [M, K], scale [M, ⌈K/128⌉] float32) per token and 128-column group."""
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    M, K = x.shape
    n_groups = triton.cdiv(K, FP8_BLOCK)
    y = torch.empty(M, K, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(M, n_groups, dtype=torch.float32, device=x.device)
    if M and K:
        grid = (triton.cdiv(M, QUANT_BLOCK_ROWS), n_groups)
        launchable(_act_quant_kernel, x)[grid](
            x, y, scale, M, K, n_groups, EXACT_ROUND=interpreting(), BM=QUANT_BLOCK_ROWS, G=FP8_BLOCK
        )
    return y, scale


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton: w [N, K] -> (e4m3 [N, K], scale_inv [⌈N/128⌉, ⌈K/128⌉] float32) per 128×128 block."""
    check_tensor("w", w, ndim=2, dtypes=FLOAT_DTYPES)
    N, K = w.shape
    grid = (triton.cdiv(N, FP8_BLOCK), triton.cdiv(K, FP8_BLOCK))
    y = torch.empty(N, K, dtype=FP8_DTYPE, device=w.device)
    scale = torch.empty(grid, dtype=torch.float32, device=w.device)
    if N and K:
        launchable(_weight_quant_kernel, w)[grid](w, y, scale, N, K, EXACT_ROUND=interpreting(), G=FP8_BLOCK)
    return y, scale


def _check_weight(w_fp8: torch.Tensor, scale_inv: torch.Tensor) -> None:
    check_tensor("w_fp8", w_fp8, ndim=2, dtypes=(FP8_DTYPE,))
    check_tensor("scale_inv", scale_inv, ndim=2, dtypes=(torch.float32,))
    expected = (triton.cdiv(w_fp8.shape[0], FP8_BLOCK), triton.cdiv(w_fp8.shape[1], FP8_BLOCK))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"scale_inv must be {expected} for w_fp8 {tuple(w_fp8.shape)} (128×128 blocks), "
            f"got {tuple(scale_inv.shape)}"
        )


def dequantize_weight(
    w_fp8: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Triton: e4m3 w [N, K] and its block scales [⌈N/128⌉, ⌈K/128⌉] -> w [N, K] in ``dtype``."""
    _check_weight(w_fp8, scale_inv)
    check_same_device(w_fp8=w_fp8, scale_inv=scale_inv)
    N, K = w_fp8.shape
    out = torch.empty(N, K, dtype=dtype, device=w_fp8.device)
    if N and K:
        launchable(_weight_dequant_kernel, w_fp8)[tuple(scale_inv.shape)](w_fp8, scale_inv, out, N, K, G=FP8_BLOCK)
    return out


def fp8_gemm(
    a_fp8: torch.Tensor,
    a_scale: torch.Tensor,
    w_fp8: torch.Tensor,
    w_scale_inv: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Triton: a [M, K] e4m3 with per-token group scales [M, ⌈K/128⌉], w [N, K] e4m3 with block scales
    [⌈N/128⌉, ⌈K/128⌉] -> a @ wᵀ [M, N] in ``out_dtype`` (float32 accumulation)."""
    check_tensor("a_fp8", a_fp8, ndim=2, dtypes=(FP8_DTYPE,))
    check_tensor("a_scale", a_scale, ndim=2, dtypes=(torch.float32,))
    _check_weight(w_fp8, w_scale_inv)
    check_same_device(a_fp8=a_fp8, a_scale=a_scale, w_fp8=w_fp8, w_scale_inv=w_scale_inv)
    (M, K), N = a_fp8.shape, w_fp8.shape[0]
    n_kb = triton.cdiv(K, FP8_BLOCK)
    if w_fp8.shape[1] != K:
        raise ValueError(f"w_fp8 must have K = {K} columns (a_fp8's), got {w_fp8.shape[1]}")
    if tuple(a_scale.shape) != (M, n_kb):
        raise ValueError(
            f"a_scale must be {(M, n_kb)} (one scale per token and 128 columns), got {tuple(a_scale.shape)}"
        )
    out = torch.empty(M, N, dtype=out_dtype, device=a_fp8.device)
    if M and N:
        grid = (triton.cdiv(M, GEMM_BLOCK_M), triton.cdiv(N, FP8_BLOCK))
        launchable(_fp8_gemm_kernel, a_fp8)[grid](
            a_fp8, a_scale, w_fp8, w_scale_inv, out, M, N, K, n_kb, BM=GEMM_BLOCK_M, G=FP8_BLOCK,
            num_warps=GEMM_NUM_WARPS, num_stages=GEMM_NUM_STAGES,
        )  # fmt: skip
    return out


def fp8_linear(
    x: torch.Tensor, w_fp8: torch.Tensor, w_scale_inv: torch.Tensor, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Triton: x [M, K] @ wᵀ for an FP8 block-quantized weight, quantizing x per token first -> [M, N]."""
    a_fp8, a_scale = quantize_activations(x)
    return fp8_gemm(a_fp8, a_scale, w_fp8, w_scale_inv, out_dtype or x.dtype)


# -- torch references ----------------------------------------------------------------------


def _pad_to_block(x: torch.Tensor, dim: int) -> torch.Tensor:
    pad = -x.shape[dim] % FP8_BLOCK
    if not pad:
        return x
    shape = list(x.shape)
    shape[dim] = pad
    return torch.cat((x, x.new_zeros(shape)), dim=dim)


def quantize_activations_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of :func:`quantize_activations`."""
    M, K = x.shape
    groups = _pad_to_block(x.float(), 1).view(M, -1, FP8_BLOCK)
    scale = groups.abs().amax(dim=-1).clamp(min=FP8_AMAX_MIN) / FP8_E4M3_MAX  # [M, Kb]
    y = (groups / scale.unsqueeze(-1)).view(M, -1)[:, :K].to(FP8_DTYPE)
    return y, scale


def _block_view(w: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [Nb, 128, Kb, 128], zero-padded."""
    padded = _pad_to_block(_pad_to_block(w, 0), 1)
    return padded.view(padded.shape[0] // FP8_BLOCK, FP8_BLOCK, padded.shape[1] // FP8_BLOCK, FP8_BLOCK)


def quantize_weight_reference(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of :func:`quantize_weight`."""
    N, K = w.shape
    blocks = _block_view(w.float())
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=FP8_AMAX_MIN) / FP8_E4M3_MAX  # [Nb, Kb]
    y = (blocks / scale[:, None, :, None]).reshape(blocks.shape[0] * FP8_BLOCK, -1)[:N, :K]
    return y.to(FP8_DTYPE), scale


def dequantize_weight_reference(
    w_fp8: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Torch reference of :func:`dequantize_weight`."""
    N, K = w_fp8.shape
    scale = scale_inv.repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)[:N, :K]
    return (w_fp8.float() * scale).to(dtype)


def fp8_gemm_reference(
    a_fp8: torch.Tensor,
    a_scale: torch.Tensor,
    w_fp8: torch.Tensor,
    w_scale_inv: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Torch reference of :func:`fp8_gemm`: dequantize both operands, float32 matmul."""
    K = a_fp8.shape[1]
    a = a_fp8.float() * a_scale.repeat_interleave(FP8_BLOCK, 1)[:, :K]
    w = dequantize_weight_reference(w_fp8, w_scale_inv, torch.float32)
    return (a @ w.T).to(out_dtype)


def fp8_linear_reference(
    x: torch.Tensor, w_fp8: torch.Tensor, w_scale_inv: torch.Tensor, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Torch reference of :func:`fp8_linear`."""
    a_fp8, a_scale = quantize_activations_reference(x)
    return fp8_gemm_reference(a_fp8, a_scale, w_fp8, w_scale_inv, out_dtype or x.dtype)
