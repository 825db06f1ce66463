"""Multi-head Latent Attention (DeepSeek-V2/V3) with its two equivalent paths.

*Naive* (training, prefill): decompress per-head keys and values from the latent with
``kv_b_proj`` and run ordinary attention. *Absorbed* (decode): fold the key half of
``kv_b_proj`` into the query and the value half into the output, so attention runs directly
over the cached latent ``c_kv`` [T, C] and the shared RoPE key ``k_pe`` [T, R]: the cache holds
``kv_lora_rank + qk_rope_head_dim`` values per token and layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raymoe.kernels import dispatch as kernels
from raymoe.platform.config import ModelConfig
from raymoe.platform.model.layers import RMSNorm, apply_rope, softmax_scale


class LatentCache:
    """Preallocated latent KV cache of every layer: ``c_kv`` [L, B, T, C] and ``k_pe`` [L, B, T, R].

    All sequences of the batch share one length (``self.length``); the serving engine keeps one
    cache row per sequence. Args:
        cfg: the model config.
        num_layers: attention layers that use the cache (main layers plus MTP modules).
        batch_size: B.
        max_len: T, the most tokens a sequence may reach.
        dtype, device: of the cache tensors.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        num_layers: int,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.c_kv = torch.zeros(num_layers, batch_size, max_len, cfg.kv_lora_rank, dtype=dtype, device=device)
        self.k_pe = torch.zeros(num_layers, batch_size, max_len, cfg.qk_rope_head_dim, dtype=dtype, device=device)
        self.length = 0
        self.max_len = max_len

    @property
    def bytes_per_token(self) -> int:
        """Cache bytes one token costs over all layers."""
        per = self.c_kv.shape[-1] + self.k_pe.shape[-1]
        return per * self.c_kv.shape[0] * self.c_kv.element_size()


class MLA(nn.Module):
    """Multi-head Latent Attention of one layer; parameter names are those of the HF checkpoint.

    Args:
        cfg: model config (``q_lora_rank``, ``kv_lora_rank``, head dims, RoPE/YaRN).
        layer_id: index of this layer's slot in a :class:`LatentCache`.
    """

    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.n_heads = cfg.num_attention_heads
        self.q_lora_rank = cfg.q_lora_rank
        self.kv_lora_rank = cfg.kv_lora_rank
        self.qk_nope_head_dim = cfg.qk_nope_head_dim
        self.qk_rope_head_dim = cfg.qk_rope_head_dim
        self.v_head_dim = cfg.v_head_dim
        self.interleave = cfg.rope_interleave
        self.softmax_scale = softmax_scale(cfg)
        D, H, qk = cfg.hidden_size, cfg.num_attention_heads, cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * cfg.v_head_dim, D, bias=cfg.attention_bias)

    # -- shared front half ------------------------------------------------------------------

    def _project(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, S, D] -> q_nope [B,S,H,dn], q_pe [B,S,H,R], c_kv [B,S,C] (normed), k_pe [B,S,R] (rotated)."""
        B, S, _ = x.shape
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, S, self.n_heads, self.qk_nope_head_dim + self.qk_rope_head_dim)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        kv = self.kv_a_proj_with_mqa(x)
        c_kv, k_pe = kv.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)
        q_pe = apply_rope(q_pe, cos, sin, self.interleave)
        k_pe = apply_rope(k_pe.unsqueeze(2), cos, sin, self.interleave).squeeze(2)
        return q_nope, q_pe, c_kv, k_pe

    # -- naive path -------------------------------------------------------------------------

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LatentCache | None = None,
        absorbed: bool | None = None,
    ) -> torch.Tensor:
        """Causal attention of x [B, S, D] -> [B, S, D].

        Without a cache, the naive path over the S tokens. With a cache, the new tokens' latents
        are written at ``cache.length`` and attention runs over all cached tokens: by the naive
        path when the cache was empty (prefill), by the absorbed path otherwise (decode);
        ``absorbed`` forces one path.
        """
        q_nope, q_pe, c_kv, k_pe = self._project(x, cos, sin)
        start = 0
        if cache is not None:
            start = cache.length
            end = start + x.shape[1]
            cache.c_kv[self.layer_id, :, start:end] = c_kv.to(cache.c_kv.dtype)
            cache.k_pe[self.layer_id, :, start:end] = k_pe.to(cache.k_pe.dtype)
            if absorbed is None:
                absorbed = start > 0
            if absorbed or start > 0:
                c_kv = cache.c_kv[self.layer_id, :, :end]
                k_pe = cache.k_pe[self.layer_id, :, :end]
        if absorbed:
            out = self._absorbed(q_nope, q_pe, c_kv, k_pe, start)
        else:
            out = self._naive(q_nope, q_pe, c_kv, k_pe, start)
        return self.o_proj(out.flatten(2))

    def _naive(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor, start: int
    ) -> torch.Tensor:
        B, S, H, _ = q_nope.shape
        T = c_kv.shape[1]
        kv = self.kv_b_proj(c_kv).view(B, T, H, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k = torch.cat((k_nope, k_pe.unsqueeze(2).expand(B, T, H, self.qk_rope_head_dim)), dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, S|T, .]
        if start == 0 and S == T:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
        else:
            mask = _causal_mask(S, T, start, q.device)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.softmax_scale)
        return out.transpose(1, 2)  # [B, S, H, dv]

    # -- absorbed path ----------------------------------------------------------------------

    def _absorbed(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor, start: int
    ) -> torch.Tensor:
        B, S, H, dn = q_nope.shape
        T = c_kv.shape[1]
        dtype = q_nope.dtype
        wkv_b = self.kv_b_proj.weight.view(H, dn + self.v_head_dim, self.kv_lora_rank).to(dtype)
        w_uk, w_uv = wkv_b.split([dn, self.v_head_dim], dim=1)  # [H, dn, C], [H, dv, C]
        # plain batched matmuls (einsum costs ~40 µs a call in the decode loop)
        q_lat = torch.bmm(q_nope.permute(2, 0, 1, 3).reshape(H, B * S, dn), w_uk)  # [H, B*S, C]
        q_lat = q_lat.view(H, B, S, -1).permute(1, 2, 0, 3).reshape(B, S * H, -1)  # [B, S*H, C]
        c_kv, k_pe = c_kv.to(dtype), k_pe.to(dtype)
        if S == 1 and start + 1 == T and kernels.use_triton(q_lat):
            o_lat = self._decode_kernel(q_lat, q_pe, c_kv, k_pe)  # [B, H, C]
        else:
            scores = torch.bmm(q_lat, c_kv.transpose(1, 2))  # [B, S*H, T]
            scores = scores + torch.bmm(q_pe.reshape(B, S * H, -1), k_pe.transpose(1, 2))
            scores = scores.float().view(B, S, H, T) * self.softmax_scale
            if S > 1 or start + S != T:
                allowed = _causal_mask(S, T, start, scores.device)[:, None, :]  # [S, 1, T]
                scores = scores.masked_fill(~allowed, float("-inf"))
            probs = scores.softmax(dim=-1).to(dtype).view(B, S * H, T)
            o_lat = torch.bmm(probs, c_kv)  # [B, S*H, C]
        o_lat = o_lat.view(B, S, H, -1).permute(2, 0, 1, 3).reshape(H, B * S, -1)  # [H, B*S, C]
        out = torch.bmm(o_lat, w_uv.transpose(1, 2))  # [H, B*S, dv]
        return out.view(H, B, S, -1).permute(1, 2, 0, 3)  # [B, S, H, dv]

    def _decode_kernel(
        self, q_lat: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor
    ) -> torch.Tensor:
        """One new token per sequence through the Triton MLA decode kernel -> o_lat [B, H, C].

        The kernel reads a paged cache [blocks, block_size, C + R]; this cache keeps c_kv and k_pe
        apart, so they are concatenated (one block per sequence): a copy of the cache per call,
        which the serving engine's paged cache (stored in the kernel's layout) does not pay."""
        B, H, T = q_lat.shape[0], self.n_heads, c_kv.shape[1]
        cache = torch.cat((c_kv, k_pe), dim=-1)  # [B, T, C + R]
        block_table = torch.arange(B, dtype=torch.int32, device=cache.device).unsqueeze(1)  # [B, 1]
        seq_lens = torch.full((B,), T, dtype=torch.int32, device=cache.device)
        q_pe = q_pe.reshape(B, H, -1).contiguous()
        return kernels.mla_decode(q_lat.contiguous(), q_pe, cache, block_table, seq_lens, self.softmax_scale)


def _causal_mask(S: int, T: int, start: int, device: torch.device) -> torch.Tensor:
    """Boolean mask [S, T], True where query i (at position start+i) may see key t (t <= start+i)."""
    q_pos = torch.arange(start, start + S, device=device)[:, None]
    k_pos = torch.arange(T, device=device)[None, :]
    return k_pos <= q_pos
