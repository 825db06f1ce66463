"""The model over one :class:`~raymoe.platform.inference.batch.StepBatch`, with the block latent cache.

Attention is the absorbed MLA path for every row (prefill chunks and decode tokens alike): the
key half of ``kv_b_proj`` is folded into the queries, attention runs over the cached latents of
each row's own sequence (gathered through its block table), and the value half is applied after
the softmax. It computes the same function as the naive path (tests check both against the
model's own forward).

The layers run as a generator, :func:`run_blocks`, that pauses at every MoE layer with an
:class:`ExpertCall` (the normalized hidden rows, the chosen experts and their weights) and resumes
with the routed experts' combined output. In one process :func:`drive` answers from the layer's
own experts; on the actor graph a stage sends the rows to the expert shards (the generator is the
same, so the math is the same).
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass

import torch

from raymoe.kernels.dispatch import mla_decode, use_triton
from raymoe.platform.inference.batch import StepBatch
from raymoe.platform.inference.cache import BlockCache
from raymoe.platform.model.attention import MLA
from raymoe.platform.model.moe import MoE
from raymoe.platform.model.transformer import Block, MTPModule


@dataclass
class ExpertCall:
    """A pause of :func:`run_blocks` at MoE layer ``layer``: route rows ``x`` [N, D] to experts ``idx`` [N, K]."""

    layer: int
    x: torch.Tensor
    idx: torch.Tensor
    weights: torch.Tensor


Program = Generator[ExpertCall, torch.Tensor, torch.Tensor]


def attend(mla: MLA, x: torch.Tensor, batch: StepBatch, cache: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Absorbed MLA of flat rows x [N, D] -> [N, D]; writes the rows' latents into ``cache`` [slots, C+R] first."""
    # q_nope [1, N, H, dn], q_pe [1, N, H, R], c_kv [1, N, C], k_pe [1, N, R]
    q_nope, q_pe, c_kv, k_pe = mla._project(x.unsqueeze(0), cos, sin)
    cache.index_copy_(0, batch.slots, torch.cat((c_kv[0], k_pe[0]), dim=-1).to(cache.dtype))
    N, H, dn, C = x.shape[0], mla.n_heads, mla.qk_nope_head_dim, mla.kv_lora_rank
    dtype = q_nope.dtype
    wkv_b = mla.kv_b_proj.weight.view(H, dn + mla.v_head_dim, C).to(dtype)
    w_uk, w_uv = wkv_b.split([dn, mla.v_head_dim], dim=1)  # [H, dn, C], [H, dv, C]
    q_lat = torch.bmm(q_nope[0].transpose(0, 1), w_uk).transpose(0, 1)  # [N, H, C]
    q = torch.cat((q_lat, q_pe[0]), dim=-1)  # [N, H, C+R]: one product against [c_kv; k_pe]
    B, S = batch.q_index.shape
    if S == 1 and B == N and use_triton(q, cache):  # decode only, on CUDA: the paged MLA decode kernel
        pages = cache.view(-1, batch.block_size, cache.shape[-1])
        q_lat, q_rope = q_lat.contiguous(), q_pe[0].contiguous()
        o_lat = mla_decode(q_lat, q_rope, pages, batch.block_table, batch.seq_lens, mla.softmax_scale)
        out = torch.bmm(o_lat.transpose(0, 1), w_uv.transpose(1, 2))  # [H, N, dv]
        return mla.o_proj(out.transpose(0, 1).reshape(N, -1))
    if S == 1 and B == N:  # decode only: no padding
        q = q.view(B, H, -1)
    else:
        q = torch.cat((q, q.new_zeros(1, H, q.shape[-1])))[batch.q_index].view(B, S * H, -1)  # [B, S*H, C+R]
    kv = cache[batch.k_slots].to(dtype)  # [B, T, C+R]
    T = kv.shape[1]
    scores = torch.bmm(q, kv.transpose(1, 2)).float().view(B, S, H, T) * mla.softmax_scale
    scores = scores.masked_fill(~batch.mask[:, :, None, :], float("-inf"))
    probs = scores.softmax(dim=-1).to(dtype).view(B, S * H, T)
    o_lat = torch.bmm(probs, kv[..., :C])  # [B, S*H, C]
    if not (S == 1 and B == N):
        o_lat = o_lat.view(B, S, H, C)[batch.q_valid]  # [N, H, C], rows in flat order
    out = torch.bmm(o_lat.view(N, H, C).transpose(0, 1), w_uv.transpose(1, 2))  # [H, N, dv]
    return mla.o_proj(out.transpose(0, 1).reshape(N, -1))


def run_blocks(
    blocks: list[Block], h: torch.Tensor, batch: StepBatch, cache: BlockCache, cos: torch.Tensor, sin: torch.Tensor
) -> Program:
    """Decoder blocks over flat rows h [N, D]; pauses at each MoE layer (see the module docstring)."""
    for block in blocks:
        layer = block.self_attn.layer_id
        h = h + attend(block.self_attn, block.input_layernorm(h), batch, cache.layer(layer), cos, sin)
        x = block.post_attention_layernorm(h)
        if isinstance(block.mlp, MoE):
            moe = block.mlp
            weights, idx, _ = moe.gate(x)
            y = yield ExpertCall(layer, x, idx, weights)
            if moe.shared_experts is not None:
                y = y + moe.shared_experts(x)
            h = h + y.to(h.dtype)
        else:
            h = h + block.mlp(x)
    return h


def rope(rotary: torch.nn.Module, batch: StepBatch, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [N, R/2] of the rows' positions, in the compute dtype."""
    return rotary.cos[batch.positions].to(dtype), rotary.sin[batch.positions].to(dtype)


def mtp_program(
    module: MTPModule, h_prev: torch.Tensor, emb_next: torch.Tensor, batch: StepBatch, cache: BlockCache, rotary
) -> Program:
    """MTP module over flat rows: combine h_prev [N, D] with the next tokens' embeddings, one block -> [N, D]."""
    h = module.combine(h_prev.to(emb_next.dtype), emb_next)
    cos, sin = rope(rotary, batch, h.dtype)
    return (yield from run_blocks([module], h, batch, cache, cos, sin))


def drive(program: Program, experts: Callable[[ExpertCall], torch.Tensor]) -> torch.Tensor:
    """Run a program to its end, answering each :class:`ExpertCall` with ``experts(call)``."""
    try:
        call = next(program)
        while True:
            call = program.send(experts(call))
    except StopIteration as stop:
        return stop.value
