"""Multi-head Latent Attention (DeepSeek-V2/V3) over flat token rows, with its two equivalent paths.

*Naive*: decompress per-head keys and values from the latent with ``kv_b_proj`` and run ordinary
attention. *Absorbed*: fold the key half of ``kv_b_proj`` into the query and the value half into
the output, so attention runs directly over the latent ``c_kv`` [T, C] and the shared RoPE key
``k_pe`` [T, R]; a cache then holds ``kv_lora_rank + qk_rope_head_dim`` values per token and layer.

The rows of one forward are N tokens, flat. Which rows form a sequence, and where their keys are,
is told by the attention context the caller passes:

- :class:`CausalAttention`: B sequences of S tokens each from position 0, no cache (training and
  whole-sequence logits): the naive path.
- :class:`PagedAttention`: rows of many sequences at any positions, keys in a paged latent cache
  (serving): each row's latent is written into the cache first; short runs (decode tokens, a token
  plus its speculative draft) take the absorbed path, which is the paged MLA decode kernel on
  CUDA; long runs (prefill chunks) take the naive path over their sequence's cached latents,
  which measures faster from :data:`NAIVE_MIN_RUN` tokens on. On the CPU each run attends over
  its own sequence's keys at its own length, read as a view of the cache when they are
  consecutive slots: nothing is padded to the longest run and the cache is not gathered.

Shape legend: N rows, H heads, dn/dv/R the nope/value/rope head dims, C kv_lora_rank, T keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from raymoe.kernels import dispatch as kernels
from raymoe.platform.config import ModelConfig
from raymoe.platform.model.layers import RMSNorm, apply_rope, softmax_scale

# The compiled CPU training path: query rows per block (a block's scores stop at its last row's key,
# so the products skip most of the masked half) ...
CAUSAL_BLOCK_ROWS = 64
# ... and the largest float32 [B, H, S, S] scores of a layer for which it runs: it keeps each block's
# bf16 probabilities for backward, so memory grows with S^2; above this the fused forward runs with a
# written-out backward that keeps only each row's logsumexp (:class:`_CausalAttention`).
BLOCKED_SCORES_MAX_BYTES = 64 * 2**20


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal SDPA of q, k [B, H, S, dqk] and v [B, H, S, dv] -> [B, H, S, dv].

    v gets zero columns up to dqk, so that SDPA takes its fused kernel. In a compiled training
    region on the CPU, plain products and a float32 softmax over blocks of query rows run instead
    (:class:`_BlockedCausalAttention`), for inductor to fuse; for larger scores, :class:`_CausalAttention`."""
    if torch.compiler.is_compiling() and q.device.type == "cpu" and torch.is_grad_enabled():
        B, H, S, _ = q.shape
        if B * H * S * S * 4 <= BLOCKED_SCORES_MAX_BYTES:
            return _BlockedCausalAttention.apply(q, k, v, scale)
        return _CausalAttention.apply(q, k, v, scale)
    dv, dqk = v.shape[-1], q.shape[-1]
    if dv < dqk:
        v = F.pad(v, (0, dqk - dv))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)[..., :dv]


def _query_blocks(S: int) -> list[tuple[int, int]]:
    """[start, end) of each block of :data:`CAUSAL_BLOCK_ROWS` query rows (the last one may be short)."""
    return [(start, min(start + CAUSAL_BLOCK_ROWS, S)) for start in range(0, S, CAUSAL_BLOCK_ROWS)]


class _BlockedCausalAttention(torch.autograd.Function):
    """Causal attention by blocks of query rows, each against the keys up to its last row (at S = 256,
    blocks of 64 do 10/16 of the full products): products in q's dtype, a float32 softmax whose
    probabilities go to the second product in v's dtype, as transformers' eager attention casts them.
    Backward keeps those bf16 probabilities (not the float32 ones autograd would keep as well), and
    ``ds = p * (dp - rowsum(dO * O))`` as in flash attention. Inductor fuses the elementwise work.

    Bench preset layer (bf16, B=8, H=8, S=256, dqk=48, dv=32), compiled, forward and backward, 2-core
    EPYC without AMX (2026-12-04, one run of each): 16.4 ms and 10.0 MiB kept for backward, against
    17.4 ms and 22.3 MiB with autograd's backward of the same forward, and 31.8 ms and 5.1 MiB for
    :class:`_CausalAttention`. Gradient error against float64 (relative to the largest), q/k/v:
    0.0071/0.0069/0.0043, against SDPA's 0.0035/0.0088/0.0062; output 0.0038 against 0.0024."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:  # noqa: ANN001
        outs, probs = [], []
        for start, end in _query_blocks(q.shape[-2]):
            scores = torch.matmul(q[..., start:end, :], k[..., :end, :].transpose(-1, -2)).float() * scale
            late = torch.ones(end - start, end, dtype=torch.bool, device=q.device).triu(1 + start)
            p = scores.masked_fill(late, float("-inf")).softmax(-1).to(v.dtype)
            outs.append(torch.matmul(p, v[..., :end, :]))
            probs.append(p)
        out = torch.cat(outs, -2)
        ctx.save_for_backward(q, k, v, out, *probs)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:  # noqa: ANN001
        q, k, v, out, *probs = ctx.saved_tensors
        grad = grad.to(v.dtype)
        delta = (grad.float() * out.float()).sum(-1, keepdim=True)  # [B, H, S, 1]: rowsum(p * dp)
        dq = []
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        for (start, end), p in zip(_query_blocks(q.shape[-2]), probs):
            g = grad[..., start:end, :]
            dp = torch.matmul(g, v[..., :end, :].transpose(-1, -2)).float()
            ds = (p.float() * (dp - delta[..., start:end, :])).to(q.dtype)
            dq.append(torch.matmul(ds, k[..., :end, :]))
            dk[..., :end, :] += torch.matmul(ds.transpose(-1, -2), q[..., start:end, :])
            dv[..., :end, :] += torch.matmul(p.transpose(-1, -2), g)
        dq = torch.cat(dq, -2) * ctx.scale
        return dq.to(q.dtype), (dk * ctx.scale).to(k.dtype), dv.to(v.dtype), None


class _CausalAttention(torch.autograd.Function):
    """The CPU's fused causal attention forward (it returns the rows' logsumexp), with a backward of
    plain products and elementwise work that inductor fuses: the compiled CPU training path where
    the blocked one would keep too many scores (:data:`BLOCKED_SCORES_MAX_BYTES`).

    The CPU's own fused backward measured 19 ms against 2.2 ms for its forward (bench preset layer,
    bf16, B=8, H=8, S=256, dqk=48, dv=32, 2 threads, 2026-12-03); this backward, compiled, 11 ms.
    The scores are recomputed in float32 (the probabilities are exponentials of them); the other
    products run in the inputs' dtype. Gradient error against float64 at that shape, relative to
    the largest gradient, q/k/v: 0.0057/0.0068/0.0034, against SDPA's 0.0033/0.0051/0.0068."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:  # noqa: ANN001
        dv, dqk = v.shape[-1], q.shape[-1]
        padded = F.pad(v, (0, dqk - dv)) if dv < dqk else v
        fused = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        out, lse = fused(q, k, padded, is_causal=True, scale=scale)[:2]
        out = out[..., :dv]
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:  # noqa: ANN001
        q, k, v, out, lse = ctx.saved_tensors
        S, T = q.shape[-2], k.shape[-2]
        late = torch.ones(S, T, dtype=torch.bool, device=q.device).triu(1)
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2))  # [B, H, S, T]
        p = torch.exp(scores * ctx.scale - lse.unsqueeze(-1)).masked_fill(late, 0.0)
        grad = grad.to(v.dtype)
        delta = (grad.float() * out.float()).sum(-1, keepdim=True)  # [B, H, S, 1]
        dp = torch.matmul(grad, v.transpose(-1, -2)).float()
        ds = (p * (dp - delta)).to(q.dtype)
        dq = torch.matmul(ds, k) * ctx.scale
        dk = torch.matmul(ds.transpose(-1, -2), q) * ctx.scale
        dv = torch.matmul(p.to(v.dtype).transpose(-1, -2), grad)
        return dq, dk, dv, None


class MLA(nn.Module):
    """Multi-head Latent Attention of one layer; parameter names are those of the HF checkpoint.

    Args:
        cfg: model config (``q_lora_rank``, ``kv_lora_rank``, head dims, RoPE/YaRN).
        layer_id: the layer's index (its slot in a paged cache).
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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: Attention) -> torch.Tensor:
        """Attention of flat rows x [N, D] (cos/sin [N, R/2] of their positions) in context ``ctx`` -> [N, D]."""
        q_nope, q_pe, c_kv, k_pe = self.project(x, cos, sin)
        out = ctx.attend(self, q_nope, q_pe, c_kv, k_pe)  # [N, H, dv]
        return self.o_proj(out.flatten(1))

    def project(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, D] -> q_nope [N, H, dn], q_pe [N, H, R], c_kv [N, C] (normed), k_pe [N, R] (rotated)."""
        N = x.shape[0]
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(N, self.n_heads, self.qk_nope_head_dim + self.qk_rope_head_dim)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)
        q_pe = apply_rope(q_pe, cos, sin, self.interleave)
        k_pe = apply_rope(k_pe.unsqueeze(1), cos, sin, self.interleave).squeeze(1)
        return q_nope, q_pe, c_kv, k_pe

    # -- the naive path ---------------------------------------------------------------------

    def naive(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor, start: int = 0
    ) -> torch.Tensor:
        """Causal attention of B runs of S queries over their T keys (the queries are keys start..start+S-1).

        q_nope [B, S, H, dn], q_pe [B, S, H, R], c_kv [B, T, C], k_pe [B, T, R] -> [B, S, H, dv]."""
        B, S, H, _ = q_nope.shape
        T = c_kv.shape[1]
        kv = self.kv_b_proj(c_kv).view(B, T, H, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k = torch.cat((k_nope, k_pe.unsqueeze(2).expand(B, T, H, self.qk_rope_head_dim)), dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, S|T, .]
        if start == 0 and S == T:
            out = causal_attention(q, k, v, self.softmax_scale)
        else:  # a chunk on a warm cache: row i sees keys up to start + i
            # written out, not SDPA with a mask: on the CPU the masked SDPA takes its math fallback, 51 ms
            # against 13 ms for this (bench preset, bf16, one thread, S = 512 over T = 1024, 2026-12-02; the
            # softmax of bf16 scores computes in float32 and rounds once, as accurate here as a float32 copy)
            late = torch.arange(T, device=q.device)[None, :] > torch.arange(start, start + S, device=q.device)[:, None]
            scores = torch.matmul(q * self.softmax_scale, k.transpose(-1, -2))  # [B, H, S, T]
            out = torch.matmul(scores.masked_fill_(late, float("-inf")).softmax(dim=-1), v)
        return out.transpose(1, 2)  # [B, S, H, dv]

    # -- the absorbed path ------------------------------------------------------------------

    def absorbed_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The key and value halves of ``kv_b_proj``: w_uk [H, dn, C], w_uv [H, dv, C], in ``dtype``."""
        H, dn = self.n_heads, self.qk_nope_head_dim
        wkv_b = self.kv_b_proj.weight.view(H, dn + self.v_head_dim, self.kv_lora_rank).to(dtype)
        return wkv_b.split([dn, self.v_head_dim], dim=1)

    def absorbed_query(self, q_nope: torch.Tensor, q_pe: torch.Tensor) -> torch.Tensor:
        """The key half of ``kv_b_proj`` folded into the query: q_nope [A, H, dn], q_pe [A, H, R] -> [A, H, C + R],
        one product against a key's [c_kv; k_pe]."""
        w_uk, _ = self.absorbed_weights(q_nope.dtype)
        q_lat = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [A, H, C]
        return torch.cat((q_lat, q_pe), dim=-1)

    def absorbed(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        latents: torch.Tensor,
        valid: torch.Tensor,
    ) -> torch.Tensor:
        """Each of A query rows over its own keys, through the latent: the paper's absorbed attention.

        q_nope [A, H, dn], q_pe [A, H, R], latents [A, T, C + R] (row a's keys: c_kv then k_pe),
        valid [A, T] bool (which of them row a sees) -> [A, H, dv]. Keys padded to the longest row:
        the form of a graph compiled to static shapes; :meth:`latent_run` is one run at its own length."""
        dtype = q_nope.dtype
        q = self.absorbed_query(q_nope, q_pe)
        kv = latents.to(dtype)
        scores = torch.bmm(q, kv.transpose(1, 2)).float() * self.softmax_scale  # [A, H, T]
        scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
        probs = scores.softmax(dim=-1).to(dtype)
        o_lat = torch.bmm(probs, kv[..., : self.kv_lora_rank])  # [A, H, C]
        return self.absorbed_output(o_lat)

    def latent_run(self, q: torch.Tensor, keys: torch.Tensor, start: int) -> torch.Tensor:
        """One run's r absorbed queries (:meth:`absorbed_query`, at positions start..start+r-1) over its
        sequence's keys 0..start+r-1, causal within the run: q [r, H, C + R], keys [start + r, C + R]
        -> the latent output [r, H, C] (apply :meth:`absorbed_output`)."""
        r, H, W = q.shape
        T = keys.shape[0]
        kv = keys.to(q.dtype)
        scores = (q.reshape(r * H, W) @ kv.T).float().view(r, H, T) * self.softmax_scale  # [r, H, T]
        if r > 1:  # row i sees keys up to start + i
            late = torch.arange(T, device=q.device)[None, :] > torch.arange(start, start + r, device=q.device)[:, None]
            scores = scores.masked_fill(late[:, None, :], float("-inf"))
        probs = scores.softmax(dim=-1).to(q.dtype)
        return (probs.view(r * H, T) @ kv[:, : self.kv_lora_rank]).view(r, H, self.kv_lora_rank)

    def absorbed_output(self, o_lat: torch.Tensor) -> torch.Tensor:
        """The value half of ``kv_b_proj`` applied after the softmax: o_lat [A, H, C] -> [A, H, dv]."""
        _, w_uv = self.absorbed_weights(o_lat.dtype)
        return torch.bmm(o_lat.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)


class Attention:
    """Where flat rows' keys are and how they group into sequences (see the module docstring)."""

    positions: torch.Tensor  # [N] int64, each row's position in its sequence

    def attend(
        self, mla: MLA, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor
    ) -> torch.Tensor:
        """Rows' attention outputs [N, H, dv] from their projections (see :meth:`MLA.project`)."""
        raise NotImplementedError

    @property
    def sequences(self) -> tuple[int, int] | None:
        """(B, S) when the rows are B sequences of S tokens each (the sequence-wise balance loss needs it)."""
        return None


@dataclass
class CausalAttention(Attention):
    """B sequences of S tokens each, rows in sequence order, from position 0, no cache: the naive path."""

    batch: int
    seq: int
    positions: torch.Tensor = field(repr=False)

    @classmethod
    def of(cls, batch: int, seq: int, device: torch.device | str = "cpu") -> CausalAttention:
        return cls(batch, seq, torch.arange(seq, device=device).repeat(batch))

    @property
    def sequences(self) -> tuple[int, int]:
        return self.batch, self.seq

    def attend(self, mla, q_nope, q_pe, c_kv, k_pe):  # noqa: ANN001, ANN201
        B, S = self.batch, self.seq
        out = mla.naive(q_nope.view(B, S, *q_nope.shape[1:]), q_pe.view(B, S, *q_pe.shape[1:]),
                        c_kv.view(B, S, -1), k_pe.view(B, S, -1))  # fmt: skip
        return out.reshape(B * S, *out.shape[2:])


# Runs of at least this many tokens take the naive path, shorter ones (decode tokens, a token and its
# MTP draft) the absorbed one. Measured by `raymoe bench attention` (bench preset, bf16, one thread,
# 2-core EPYC, 2026-12-01), one layer, ms naive / absorbed with 512 tokens cached: S=1 1.70/1.06,
# S=2 1.47/1.20, S=4 1.62/1.37, S=8 1.79/1.81, S=16 2.14/2.83, S=64 4.07/10.2, S=512 39/307. The
# FLOP count alone (naive_flop_crossover) puts the switch at 43: the absorbed path also reads each
# row's own copy of its keys, which the naive path reads once per run.
NAIVE_MIN_RUN = 8


def naive_min_run(cfg: ModelConfig) -> int:
    """Run length from which a serving run takes the naive attention path (:data:`NAIVE_MIN_RUN`, measured)."""
    return NAIVE_MIN_RUN


def naive_flop_crossover(cfg: ModelConfig) -> int:
    """Run length from which naive attention costs fewer FLOPs than absorbed attention.

    Per query and key, absorbed attention costs 2C + R multiply-adds per head, naive dn + R + dv;
    naive also decompresses every key once (C·(dn + dv) per head). Over S queries and T keys,
    naive wins when S·(2C − dn − dv) > C·(dn + dv): S > 43 on the bench preset, 171 on DeepSeek-V3."""
    C, dn, dv = cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.v_head_dim
    gain = 2 * C - dn - dv
    if gain <= 0:
        return 1 << 30  # absorbed always cheaper
    return C * (dn + dv) // gain + 1


Run = tuple[int, int, int, list[tuple[int, int]]]  # (first row, length, start, key segments (slot, count))


@dataclass
class PagedAttention(Attention):
    """Rows of many sequences over a paged latent cache (the serving engine's step; see the module docstring).

    The cache of every layer is ``kv`` [L * slots_per_layer, C + R], layer after layer; a row's latent
    goes to ``slots[row] + layer_base[layer]``. A run names its keys 0..start+length-1 by segments,
    (first slot, count) ranges of consecutive slots of one layer; a run of one segment reads its keys
    as a view of the cache. Rows in ``absorbed_rows`` (all rows when None) take the absorbed path,
    run by run of ``absorbed_runs`` (first row counted among the absorbed rows), each at its own
    length; each run of ``naive_runs`` (first row among all rows) takes the naive path.

    Args:
        kv: the cache, written in place (index the base tensor, not a view: a compiled graph would
            otherwise copy the layer back).
        layer_base: layer id -> its first slot in ``kv``.
        positions, slots: [N] per row.
        absorbed_rows: [A] rows of the absorbed path, or None for all N.
        absorbed_runs, naive_runs: the runs of each path (see above).
        block_table, seq_lens: [A, max_blocks] int32 and [A] int32, each absorbed row's sequence's blocks
            and its position + 1, for the CUDA kernel.
        block_size: tokens per cache block.
        key_slots, key_valid: [A, T], each absorbed row's keys padded to the longest row (slot 0 past its
            end) and which it sees: only a graph compiled to static shapes passes them, in place of runs.
    """

    kv: torch.Tensor = field(repr=False)
    layer_base: dict[int, int]
    positions: torch.Tensor = field(repr=False)
    slots: torch.Tensor = field(repr=False)
    absorbed_rows: torch.Tensor | None = field(repr=False)
    absorbed_runs: list[Run] = field(repr=False)
    block_table: torch.Tensor = field(repr=False)
    seq_lens: torch.Tensor = field(repr=False)
    block_size: int
    naive_runs: list[Run] = field(default_factory=list, repr=False)
    key_slots: torch.Tensor | None = field(default=None, repr=False)
    key_valid: torch.Tensor | None = field(default=None, repr=False)

    def attend(self, mla, q_nope, q_pe, c_kv, k_pe):  # noqa: ANN001, ANN201
        base = self.layer_base[mla.layer_id]
        self.kv.index_copy_(0, self.slots + base, torch.cat((c_kv, k_pe), dim=-1).to(self.kv.dtype))
        if not self.naive_runs:  # every row absorbed (decode steps, compiled graphs): no gathers of rows
            return self._absorbed(mla, q_nope, q_pe, base)
        out = q_nope.new_empty(q_nope.shape[0], mla.n_heads, mla.v_head_dim)
        if self.absorbed_rows is None or self.absorbed_rows.numel():
            rows = self.absorbed_rows
            part = self._absorbed(mla, q_nope.index_select(0, rows), q_pe.index_select(0, rows), base)
            out.index_copy_(0, rows, part.to(out.dtype))
        C = mla.kv_lora_rank
        for first, length, start, segments in self.naive_runs:
            latents = self.keys(segments, base).to(q_nope.dtype)  # [start + length, C + R]
            q_n, q_p = q_nope[first : first + length], q_pe[first : first + length]
            run = mla.naive(q_n[None], q_p[None], latents[None, :, :C], latents[None, :, C:], start)
            out[first : first + length] = run[0].to(out.dtype)
        return out

    def keys(self, segments: list[tuple[int, int]], base: int) -> torch.Tensor:
        """A run's keys [T, C + R] in one layer: a view of the cache when they are one segment."""
        if len(segments) == 1:
            slot, count = segments[0]
            return self.kv[base + slot : base + slot + count]
        return torch.cat([self.kv[base + slot : base + slot + count] for slot, count in segments])

    def _absorbed(self, mla: MLA, q_nope: torch.Tensor, q_pe: torch.Tensor, base: int) -> torch.Tensor:
        if kernels.use_triton(q_nope, self.kv):  # on CUDA: the paged MLA decode kernel, one query per row
            w_uk, _ = mla.absorbed_weights(q_nope.dtype)
            q_lat = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1).contiguous()  # [A, H, C]
            slots_per_layer = self.kv.shape[0] // len(self.layer_base)  # the kernel reads one layer's pages
            pages = self.kv[base : base + slots_per_layer].view(-1, self.block_size, self.kv.shape[-1])
            o_lat = kernels.mla_decode(q_lat, q_pe.contiguous(), pages, self.block_table, self.seq_lens,
                                       mla.softmax_scale)  # fmt: skip
            return mla.absorbed_output(o_lat)
        if self.key_slots is not None:  # a compiled graph: keys padded to the longest row
            return mla.absorbed(q_nope, q_pe, self.kv[self.key_slots + base], self.key_valid)
        q = mla.absorbed_query(q_nope, q_pe)  # [A, H, C + R]
        o_lat = q.new_empty(q.shape[0], mla.n_heads, mla.kv_lora_rank)
        for first, length, start, segments in self.absorbed_runs:  # each run at its own length
            o_lat[first : first + length] = mla.latent_run(q[first : first + length], self.keys(segments, base), start)
        return mla.absorbed_output(o_lat)
