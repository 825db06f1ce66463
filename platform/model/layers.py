"""Small building blocks: RMSNorm, the SwiGLU MLP, and RoPE with YaRN scaling.

Shape legend used across ``raymoe.platform.model``: B batch, S sequence (new tokens), T keys
(cached + new), H heads, D hidden, R rope dim, C kv latent (kv_lora_rank), E routed experts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from raymoe.kernels import dispatch as kernels
from raymoe.platform.config import ModelConfig


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 whatever the input dtype.

    Args:
        dim: size of the normalized (last) dimension.
        eps: added to the mean square.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.use_triton(x):  # the same arithmetic in one Triton kernel (CUDA, or forced)
            return kernels.rms_norm(x, self.weight, self.eps)
        # one fused kernel instead of five ops (decode runs ~25 of these per token)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``; dense layers and shared experts.

    Args:
        hidden_size: D.
        intermediate_size: width of the gated hidden layer.
    """

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# --------------------------------------------------------------------------- RoPE / YaRN


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: ``0.1·mscale·ln(factor) + 1`` (1 when not extending)."""
    if factor <= 1:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


def softmax_scale(cfg: ModelConfig) -> float:
    """``1/sqrt(qk_head_dim)``, multiplied by mscale² under YaRN (DeepSeek-V3 §2.1 / YaRN)."""
    scale = cfg.qk_head_dim**-0.5
    rs = cfg.rope_scaling
    if rs is not None and rs.mscale_all_dim:
        m = yarn_mscale(rs.factor, rs.mscale_all_dim)
        scale = scale * m * m
    return scale


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies of the decoupled RoPE [R/2] and the cos/sin scale (YaRN-corrected)."""
    dim = cfg.qk_rope_head_dim
    base = cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    inv_freq = 1.0 / pos_freqs
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq, 1.0

    def correction_dim(rotations: float) -> float:
        return dim * math.log(rs.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(rs.beta_fast)), 0)
    high = min(math.ceil(correction_dim(rs.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolate = 1 - ramp  # 1: keep the original frequency (high-frequency dims)
    inv_freq = (1.0 / (rs.factor * pos_freqs)) * (1 - extrapolate) + inv_freq * extrapolate
    if rs.mscale and rs.mscale_all_dim:
        attention_factor = yarn_mscale(rs.factor, rs.mscale) / yarn_mscale(rs.factor, rs.mscale_all_dim)
    else:
        attention_factor = yarn_mscale(rs.factor)
    return inv_freq, attention_factor


class RotaryEmbedding(nn.Module):
    """cos/sin tables of the decoupled RoPE for every position up to ``max_position_embeddings``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        inv_freq, attention_factor = rope_inv_freq(cfg)
        positions = torch.arange(cfg.max_position_embeddings, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)  # [P, R/2]
        self.register_buffer("cos", freqs.cos() * attention_factor, persistent=False)
        self.register_buffer("sin", freqs.sin() * attention_factor, persistent=False)
        self.interleave = cfg.rope_interleave

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, S] or [S] -> cos, sin [..., S, R/2] in float32."""
        return self.cos[positions], self.sin[positions]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate ``x`` [B, S, H, R] by cos/sin [B, S, R/2] (or [S, R/2]), given in x's dtype.

    DeepSeek's checkpoints store the rotary dims as interleaved pairs (x0, x1), (x2, x3), ...;
    the result is laid out de-interleaved ([rotated evens, rotated odds]), as in transformers.
    Queries and keys get the same layout, so their dot products are those of the paper.
    """
    cos = cos.unsqueeze(-2)  # [.., S, 1, R/2]
    sin = sin.unsqueeze(-2)
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
