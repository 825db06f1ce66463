"""A runner whose small steps (decode, decode + draft) run as one ``torch.compile``d graph.

:class:`~raymoe.platform.inference.runner.LocalRunner` runs a step eagerly through the generator
:func:`~raymoe.platform.inference.forward.run_blocks`; at batch 1 a decode token costs hundreds of
tiny ops and the step is bound by their overhead, not by arithmetic. :class:`CompiledLocalRunner`
runs steps of at most ``max_rows`` rows and runs of at most ``max_run`` tokens through
:func:`blocks_forward`, the same math written as one function without graph breaks:

- attention is :func:`~raymoe.platform.inference.forward.attend`'s absorbed MLA over the block
  cache, with the padding rows dropped by a gather (``out_index``) instead of a boolean mask;
- the routed experts are data-independent: each row gathers its K chosen experts' weights and
  runs them as batched products (:func:`routed_experts`), so no ``.tolist()``/``bincount`` breaks
  the graph.

The cache is written in place inside the graph. Sizes N (rows), B (runs), T (context) and the
number of logit rows are dynamic; larger steps (prefill chunks) fall back to the eager parent.
Shape legend as in :mod:`raymoe.platform.inference.batch`: N rows, B runs, S longest run, T keys.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
import torch.fx.experimental._config
import torch.nn.functional as F

from raymoe.platform.inference.batch import SeqRun, StepBatch, build_step
from raymoe.platform.inference.runner import LocalRunner
from raymoe.platform.model.attention import MLA
from raymoe.platform.model.layers import MLP, RMSNorm, apply_rope
from raymoe.platform.model.moe import Experts, MoE
from raymoe.platform.model.transformer import Block, DeepseekV3

logger = logging.getLogger(__name__)


def _no_duck_sizing():
    """Sizes that happen to be equal (rows and runs at batch 2) must not become one symbol, or a
    later step where they differ would compile again (a trace-time setting, so scoped to the call)."""
    return torch.fx.experimental._config.patch(use_duck_shape=False)


def rms_norm(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """:class:`RMSNorm` without its kernel switch (whose context variable would break the graph)."""
    return norm.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=norm.eps).to(x.dtype)


def swiglu(mlp: MLP, x: torch.Tensor) -> torch.Tensor:
    return mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))


def routed_experts(experts: Experts, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_k weights[:, k] · expert_{idx[:, k]}(x) for x [N, D], idx/weights [N, K] -> [N, D], without graph breaks.

    Each (row, choice) pair gathers its expert's weights, so the work is N·K expert products
    whatever the routing (a batched product of one row each). Measured on one bench-preset layer
    (bf16, 1 thread, compiled), ms at N = 1 / 4 / 16 rows: this 0.41 / 0.67 / 2.7, ``grouped_mm``
    over sorted rows 0.68 / 1.2 / 4.9, all experts dense with masked weights 1.4 / 5.6 / 5.6."""
    N, K = idx.shape
    flat = idx.reshape(-1)  # [N*K]
    w13 = experts.gate_up_proj.index_select(0, flat)  # [N*K, 2I, D]
    w2 = experts.down_proj.index_select(0, flat)  # [N*K, D, I]
    xk = x.unsqueeze(1).expand(N, K, x.shape[-1]).reshape(N * K, 1, -1)  # [N*K, 1, D]
    gate, up = torch.bmm(xk, w13.transpose(1, 2)).chunk(2, dim=-1)  # [N*K, 1, I] each
    y = torch.bmm(F.silu(gate) * up, w2.transpose(1, 2))  # [N*K, 1, D]
    y = y.view(N, K, -1) * weights.to(y.dtype).unsqueeze(-1)
    return y.sum(dim=1).to(x.dtype)


def project(mla: MLA, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """``MLA._project`` of flat rows x [N, D] -> q_nope [N,H,dn], q_pe [N,H,R], c_kv [N,C], k_pe [N,R]."""
    N = x.shape[0]
    if mla.q_lora_rank is None:
        q = mla.q_proj(x)
    else:
        q = mla.q_b_proj(rms_norm(mla.q_a_layernorm, mla.q_a_proj(x)))
    q = q.view(N, mla.n_heads, mla.qk_nope_head_dim + mla.qk_rope_head_dim)
    q_nope, q_pe = q.split([mla.qk_nope_head_dim, mla.qk_rope_head_dim], dim=-1)
    c_kv, k_pe = mla.kv_a_proj_with_mqa(x).split([mla.kv_lora_rank, mla.qk_rope_head_dim], dim=-1)
    c_kv = rms_norm(mla.kv_a_layernorm, c_kv)
    q_pe = apply_rope(q_pe, cos, sin, mla.interleave)
    k_pe = apply_rope(k_pe.unsqueeze(1), cos, sin, mla.interleave).squeeze(1)
    return q_nope, q_pe, c_kv, k_pe


def attend_flat(
    mla: MLA,
    x: torch.Tensor,
    kv_all: torch.Tensor,
    layer: int,
    slots_per_layer: int,
    slots: torch.Tensor,
    q_index: torch.Tensor,
    out_index: torch.Tensor,
    k_slots: torch.Tensor,
    mask: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> torch.Tensor:
    """:func:`~raymoe.platform.inference.forward.attend` as one graph: x [N, D] -> [N, D].

    kv_all [L * slots_per_layer, C+R] is the whole cache, layer after layer (written in place at
    ``slots`` of ``layer``); out_index [N]
    is each flat row's place in the [B*S] query grid."""
    q_nope, q_pe, c_kv, k_pe = project(mla, x, cos, sin)
    # index the flat base tensor itself: writing through a view of one layer made the compiled
    # graph copy that layer's whole cache back every step (measured: 2.4 MB a layer at 8k tokens)
    base = layer * slots_per_layer
    kv_all.index_copy_(0, slots + base, torch.cat((c_kv, k_pe), dim=-1).to(kv_all.dtype))
    N, H, dn, C = x.shape[0], mla.n_heads, mla.qk_nope_head_dim, mla.kv_lora_rank
    dtype = q_nope.dtype
    w_uk, w_uv = mla.kv_b_proj.weight.view(H, dn + mla.v_head_dim, C).split([dn, mla.v_head_dim], dim=1)
    q_lat = torch.bmm(q_nope.transpose(0, 1), w_uk.to(dtype)).transpose(0, 1)  # [N, H, C]
    q = torch.cat((q_lat, q_pe), dim=-1)  # [N, H, C+R]
    B, S = q_index.shape
    q = torch.cat((q, q.new_zeros(1, H, q.shape[-1])))[q_index].view(B, S * H, -1)  # [B, S*H, C+R]
    kv = kv_all[k_slots + base].to(dtype)  # [B, T, C+R]
    T = kv.shape[1]
    scores = torch.bmm(q, kv.transpose(1, 2)).float().view(B, S, H, T) * mla.softmax_scale
    scores = scores.masked_fill(~mask[:, :, None, :], float("-inf"))
    probs = scores.softmax(dim=-1).to(dtype).view(B, S * H, T)
    o_lat = torch.bmm(probs, kv[..., :C]).view(B * S, H, C).index_select(0, out_index)  # [N, H, C]
    out = torch.bmm(o_lat.transpose(0, 1), w_uv.to(dtype).transpose(1, 2))  # [H, N, dv]
    return mla.o_proj(out.transpose(0, 1).reshape(N, -1))


def blocks_forward(
    blocks: list[Block],
    h: torch.Tensor,
    kv_all: torch.Tensor,
    cache_index: dict[int, int],
    step: tuple[torch.Tensor, ...],
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> torch.Tensor:
    """:func:`~raymoe.platform.inference.forward.run_blocks` with the experts answered inline: h [N, D] -> [N, D]."""
    slots, q_index, out_index, k_slots, mask = step
    for block in blocks:
        mla = block.self_attn
        x = rms_norm(block.input_layernorm, h)
        layer = cache_index[mla.layer_id]
        slots_per_layer = kv_all.shape[0] // len(cache_index)
        h = h + attend_flat(mla, x, kv_all, layer, slots_per_layer, slots, q_index, out_index, k_slots, mask, cos, sin)
        x = rms_norm(block.post_attention_layernorm, h)
        if isinstance(block.mlp, MoE):
            moe = block.mlp
            weights, idx, _ = moe.gate(x)
            y = routed_experts(moe.experts, x, idx, weights)
            if moe.shared_experts is not None:
                y = y + swiglu(moe.shared_experts, x)
            h = h + y.to(h.dtype)
        else:
            h = h + swiglu(block.mlp, x)
    return h


class CompiledLocalRunner(LocalRunner):
    """:class:`LocalRunner` whose steps of <= ``max_rows`` rows and runs of <= ``max_run`` tokens are compiled.

    Args:
        model, num_blocks, block_size, cache_dtype: as :class:`LocalRunner`.
        max_rows: the largest step (rows N) run by the compiled graph; larger ones run eagerly.
        max_run: the longest run (S) compiled: 1 is decode, 2 decode with an MTP draft.
        backend: ``torch.compile``'s backend; ``None`` runs the same functions eagerly (tests of
            the math, debugging), ``"eager"`` only traces them (tests that one graph serves all).
        warmup: compile in the constructor (see :meth:`warmup`); otherwise at the first step.
    """

    def __init__(
        self,
        model: DeepseekV3,
        num_blocks: int,
        block_size: int,
        cache_dtype: torch.dtype | None = None,
        *,
        max_rows: int = 8,
        max_run: int = 2,
        backend: str | None = "inductor",
        warmup: bool = True,
    ) -> None:
        if max_rows < 2 or not 1 <= max_run <= block_size:
            raise ValueError(f"max_rows must be >= 2 and max_run in [1, block_size], got {max_rows}, {max_run}")
        super().__init__(model, num_blocks, block_size, cache_dtype)
        self.max_rows, self.max_run = max_rows, max_run
        m = self.model.model
        self._main_blocks = list(m.layers)
        self._cache_index = dict(self.cache.index)
        self._kv_flat = self.cache.kv.view(-1, self.cache.kv.shape[-1])  # [L * slots, C+R]
        main_fn: Callable = self._main_step
        mtp_fn: Callable = self._mtp_step
        if backend is not None:
            torch._dynamo.mark_static(self._kv_flat)
            main_fn = torch.compile(main_fn, backend=backend, dynamic=True, fullgraph=True)
            mtp_fn = torch.compile(mtp_fn, backend=backend, dynamic=True, fullgraph=True)
        self._main_fn, self._mtp_fn = main_fn, mtp_fn
        self.compile_seconds = 0.0
        self.compiled_steps = 0
        if backend is not None and warmup:
            self.warmup()

    # -- the compiled functions (no graph breaks) -------------------------------------------

    def _main_step(self, tokens, positions, step, logit_rows):
        m = self.model.model
        h = m.embed_tokens(tokens)
        cos, sin = m.rotary_emb.cos[positions].to(h.dtype), m.rotary_emb.sin[positions].to(h.dtype)
        h = blocks_forward(self._main_blocks, h, self._kv_flat, self._cache_index, step, cos, sin)
        h = rms_norm(m.norm, h)
        return self.model.lm_head(h.index_select(0, logit_rows)).float(), h

    def _mtp_step(self, tokens, positions, step, hidden, logit_rows):
        m = self.model.model
        module = m.mtp[0]
        emb = m.embed_tokens(tokens)
        h = module.eh_proj(torch.cat((rms_norm(module.enorm, emb), rms_norm(module.hnorm, hidden.to(emb.dtype))), -1))
        cos, sin = m.rotary_emb.cos[positions].to(h.dtype), m.rotary_emb.sin[positions].to(h.dtype)
        h = blocks_forward([module], h, self._kv_flat, self._cache_index, step, cos, sin)
        return self.model.lm_head(rms_norm(module.shared_head.norm, h.index_select(0, logit_rows))).float()

    # -- the runner interface ---------------------------------------------------------------

    def compiles(self, batch: StepBatch) -> bool:
        """Whether ``batch`` runs through the compiled graph (else the eager parent)."""
        return batch.num_rows <= self.max_rows and max(batch.lengths) <= self.max_run

    def _pad(self, batch: StepBatch, logit_rows: torch.Tensor, hidden: torch.Tensor | None = None):
        """The step's tensors padded to the graph's canonical form, so one graph serves every step.

        Rows N, runs B and logit rows are padded to at least 2 (a size of 1 would be specialized
        into a graph of its own), runs to ``max_run`` tokens, the context T to a whole number of
        cache blocks. A padding row is token 0 at position 0 writing slot 0 (the padding block,
        never read unmasked); a padding query reads the zero row and sees key 0 only."""
        N, (B, S), T = batch.num_rows, batch.q_index.shape, batch.k_slots.shape[1]
        n, b, s = max(N, 2), max(B, 2), self.max_run
        t = max(-(-T // self.block_size) * self.block_size, 2)
        device = batch.tokens.device
        tokens = torch.zeros(n, dtype=torch.long, device=device)
        tokens[:N] = batch.tokens
        positions = torch.zeros(n, dtype=torch.long, device=device)
        positions[:N] = batch.positions
        slots = torch.zeros(n, dtype=torch.long, device=device)
        slots[:N] = batch.slots
        q_index = torch.full((b, s), n, dtype=torch.long, device=device)
        q_index[:B, :S] = torch.where(batch.q_valid, batch.q_index, n)
        q_valid = torch.zeros(b, s, dtype=torch.bool, device=device)
        q_valid[:B, :S] = batch.q_valid
        out_index = torch.zeros(n, dtype=torch.long, device=device)
        out_index[:N] = q_valid.reshape(-1).nonzero().squeeze(1)  # runs are consecutive: flat row order
        k_slots = torch.zeros(b, t, dtype=torch.long, device=device)
        k_slots[:B, :T] = batch.k_slots
        mask = torch.zeros(b, s, t, dtype=torch.bool, device=device)
        mask[..., 0] = True
        mask[:B, :S, :T] = batch.mask
        L = logit_rows.shape[0]
        rows = torch.zeros(max(L, 2), dtype=torch.long, device=device)
        rows[:L] = logit_rows
        inputs = [tokens, positions, (slots, q_index, out_index, k_slots, mask)]
        if hidden is not None:
            padded = hidden.new_zeros(n, hidden.shape[1])
            padded[:N] = hidden
            inputs.append(padded)
        return inputs + [rows]

    @torch.inference_mode()
    def main(
        self, batch: StepBatch, logit_rows: torch.Tensor, hidden_rows: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.compiles(batch):
            return super().main(batch, logit_rows, hidden_rows)
        self.compiled_steps += 1
        batch, logit_rows, hidden_rows = self._on_device(batch, logit_rows, hidden_rows)
        with _no_duck_sizing():
            logits, h = self._main_fn(*self._pad(batch, logit_rows))
        logits = logits[: logit_rows.shape[0]]
        return logits, (h.index_select(0, hidden_rows) if hidden_rows is not None else None)

    @torch.inference_mode()
    def mtp(self, batch: StepBatch, hidden: torch.Tensor, logit_rows: torch.Tensor) -> torch.Tensor:
        if not self.compiles(batch):
            return super().mtp(batch, hidden, logit_rows)
        self.compiled_steps += 1
        batch, logit_rows, hidden = self._on_device(batch, logit_rows, hidden)
        with _no_duck_sizing():
            logits = self._mtp_fn(*self._pad(batch, logit_rows, hidden))
        return logits[: logit_rows.shape[0]]

    def warmup(self) -> float:
        """Compile every graph a step can need (see :meth:`compiles`); returns and logs the seconds it took."""
        start = time.perf_counter()
        # two one-token runs in the padding block, padded like any step: every size is symbolic from
        # the first trace, so later steps reuse this graph
        runs = [SeqRun([0], 0, [0]) for _ in range(2)]
        batch = build_step(runs, self.block_size)
        rows = torch.arange(batch.num_rows)
        _, hidden = self.main(batch, rows, rows)
        if self.has_mtp:
            self.mtp(batch, hidden, rows)
        self.cache.kv[:, 0].zero_()
        self.compile_seconds += time.perf_counter() - start
        logger.info("compiled the decode step in %.1f s", self.compile_seconds)
        return self.compile_seconds
