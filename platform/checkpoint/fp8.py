"""DeepSeek-V3's FP8 (e4m3) block-wise quantization, in plain torch.

These are the reference implementations (the Triton kernels in ``raymoe.kernels`` are tested
against them) and what the checkpoint loader uses to dequantize DeepSeek's FP8 weights:

- weights: 128×128 blocks, one float32 ``scale_inv`` per block, ``w ≈ w_fp8 · scale_inv``;
  edge blocks of a shape that is not a multiple of 128 are partial and have a scale of their own;
- activations: per token, groups of 128 along the last dimension, scale ``amax / 448``.

``scale_inv`` is DeepSeek's name: the quantizer divides by it, the dequantizer multiplies by it.
"""

from __future__ import annotations

import math

import torch

FP8_E4M3_MAX = 448.0  # largest finite float8_e4m3fn value
FP8_BLOCK = 128  # weight block edge and activation group size of DeepSeek-V3's checkpoints
FP8_DTYPE = torch.float8_e4m3fn
_MIN_SCALE = torch.finfo(torch.float32).tiny  # keeps an all-zero block's scale finite and nonzero


def scale_shape(shape: tuple[int, ...] | torch.Size, block: int = FP8_BLOCK) -> tuple[int, int]:
    """Shape of the ``scale_inv`` of a weight [out, in]: [⌈out/block⌉, ⌈in/block⌉]."""
    out_features, in_features = shape
    return math.ceil(out_features / block), math.ceil(in_features / block)


def _expand_blocks(scale_inv: torch.Tensor, shape: tuple[int, int], block: int) -> torch.Tensor:
    """scale_inv [⌈M/b⌉, ⌈N/b⌉] -> [M, N], each scale repeated over its (possibly partial) block."""
    rows, cols = shape
    return scale_inv.repeat_interleave(block, dim=0)[:rows].repeat_interleave(block, dim=1)[:, :cols]


def quantize_fp8_blockwise(w: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a weight [M, N] to e4m3 with one scale per block×block tile.

    Returns ``(w_fp8 [M, N] float8_e4m3fn, scale_inv [⌈M/block⌉, ⌈N/block⌉] float32)`` with
    ``scale_inv = amax(|tile|) / 448``, so that the largest value of every tile maps to 448.
    """
    if w.dim() != 2:
        raise ValueError(f"quantize_fp8_blockwise expects a 2-D weight [out, in], got shape {tuple(w.shape)}")
    rows, cols = w.shape
    n_row_blocks, n_col_blocks = scale_shape(w.shape, block)
    w32 = w.float()
    padded = w32.new_zeros(n_row_blocks * block, n_col_blocks * block)
    padded[:rows, :cols] = w32
    tiles = padded.view(n_row_blocks, block, n_col_blocks, block)
    amax = tiles.abs().amax(dim=(1, 3))  # [⌈M/b⌉, ⌈N/b⌉]
    scale_inv = (amax / FP8_E4M3_MAX).clamp_min(_MIN_SCALE)
    scaled = w32 / _expand_blocks(scale_inv, (rows, cols), block)
    w_fp8 = scaled.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_DTYPE)
    return w_fp8, scale_inv


def dequantize_fp8_blockwise(
    w_fp8: torch.Tensor,
    scale_inv: torch.Tensor,
    block: int = FP8_BLOCK,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """w_fp8 [M, N] (e4m3), scale_inv [⌈M/block⌉, ⌈N/block⌉] -> w [M, N] in ``dtype``.

    The product is taken in float32 (exact up to float32 rounding: an e4m3 value has a 4-bit
    significand), then cast to ``dtype``.
    """
    if w_fp8.dim() != 2:
        raise ValueError(f"dequantize_fp8_blockwise expects a 2-D weight [out, in], got shape {tuple(w_fp8.shape)}")
    expected = scale_shape(w_fp8.shape, block)
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"scale_inv has shape {tuple(scale_inv.shape)}, expected {expected} for a weight of shape "
            f"{tuple(w_fp8.shape)} in {block}×{block} blocks"
        )
    scale = _expand_blocks(scale_inv.float(), tuple(w_fp8.shape), block)
    return (w_fp8.float() * scale).to(dtype)


def quantize_fp8_activation(x: torch.Tensor, group: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token group quantization of activations x [..., K] (groups of ``group`` along K).

    Returns ``(x_fp8 [..., K] float8_e4m3fn, scale [..., ⌈K/group⌉] float32)`` with
    ``scale = amax(|group|) / 448``; the last group is partial when K is not a multiple of ``group``.
    """
    *lead, k = x.shape
    n_groups = math.ceil(k / group)
    x32 = x.float()
    padded = x32.new_zeros(*lead, n_groups * group)
    padded[..., :k] = x32
    amax = padded.view(*lead, n_groups, group).abs().amax(dim=-1)  # [..., G]
    scale = (amax / FP8_E4M3_MAX).clamp_min(_MIN_SCALE)
    scaled = x32 / scale.repeat_interleave(group, dim=-1)[..., :k]
    return scaled.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_DTYPE), scale


def dequantize_fp8_activation(
    x_fp8: torch.Tensor, scale: torch.Tensor, group: int = FP8_BLOCK, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """x_fp8 [..., K] (e4m3), scale [..., ⌈K/group⌉] -> x [..., K] in ``dtype``."""
    k = x_fp8.shape[-1]
    if scale.shape[-1] != math.ceil(k / group) or scale.shape[:-1] != x_fp8.shape[:-1]:
        raise ValueError(
            f"scale has shape {tuple(scale.shape)}, expected {(*x_fp8.shape[:-1], math.ceil(k / group))} "
            f"for activations of shape {tuple(x_fp8.shape)} in groups of {group}"
        )
    return (x_fp8.float() * scale.float().repeat_interleave(group, dim=-1)[..., :k]).to(dtype)
