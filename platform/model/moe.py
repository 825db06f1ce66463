"""DeepSeekMoE: the sigmoid, group-limited gate, the routed experts and the MoE layer.

The gate *chooses* experts by top-k of (affinity + bias) inside the best ``topk_group`` of
``n_group`` groups and *weighs* them by the unbiased affinities, normalized, times
``routed_scaling_factor``. The bias ``e_score_correction_bias`` is a buffer: it is changed only
by the auxiliary-loss-free rule at the optimizer step (``raymoe.platform.train.balance``),
never by gradients. The tokens routed to each expert (for that rule and for MaxVio) are counted
by whoever runs the forward, from the routing it sees (``raymoe.platform.train.balance.LoadCounter``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raymoe.kernels import dispatch as kernels
from raymoe.platform.config import ModelConfig
from raymoe.platform.model.layers import MLP


class Gate(nn.Module):
    """Router of one MoE layer: ``weight`` [E, D] (float32) and the bias buffer [E].

    Args:
        cfg: model config (``n_routed_experts``, ``num_experts_per_tok``, ``n_group``,
            ``topk_group``, ``norm_topk_prob``, ``routed_scaling_factor``).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_experts = cfg.n_routed_experts
        self.top_k = cfg.num_experts_per_tok
        self.n_group = cfg.n_group
        self.topk_group = cfg.topk_group
        self.norm_topk_prob = cfg.norm_topk_prob
        self.routed_scaling_factor = cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))

    def _apply(self, fn, recurse=True):  # noqa: ANN001
        # the router stays float32 when the model is cast (``model.to(torch.bfloat16)``): bias steps
        # of γ = 0.001 vanish in bf16 rounding, and the scores decide the routing
        super()._apply(fn, recurse)
        self.weight.data = self.weight.data.float()
        self.e_score_correction_bias.data = self.e_score_correction_bias.data.float()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, D] -> (weights [N, K] float32, expert ids [N, K], affinities [N, E] float32)."""
        with torch.autocast(x.device.type, enabled=False):
            scores = F.linear(x.float(), self.weight.float()).sigmoid()  # [N, E]
        idx = route(scores.detach(), self.e_score_correction_bias, self.top_k, self.n_group, self.topk_group)  # [N, K]
        weights = scores.gather(1, idx)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.routed_scaling_factor, idx, scores


def route(scores: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int, topk_group: int) -> torch.Tensor:
    """Expert choice: top-k of biased affinities within the top ``topk_group`` groups.

    A group's score is the sum of its two highest biased affinities. scores [N, E] -> ids [N, K].
    """
    biased = biased_scores(scores, bias)  # [N, E]
    N, E = biased.shape
    if n_group > 1 and topk_group < n_group:
        grouped = biased.view(N, n_group, E // n_group)
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [N, G]
        group_idx = group_scores.topk(topk_group, dim=-1).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
        biased = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(N, E)
    return biased.topk(top_k, dim=-1).indices


def biased_scores(scores: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """What the choice ranks: affinities [N, E] plus the balancing bias [E] (the weights use the unbiased ones)."""
    return scores + bias


class Experts(nn.Module):
    """The routed SwiGLU experts of one layer, stacked: ``gate_up_proj`` [E, 2I, D], ``down_proj`` [E, D, I].

    Args:
        n_experts: E (on an expert shard, the experts it holds).
        hidden_size: D.
        intermediate_size: I (``moe_intermediate_size``).
    """

    def __init__(self, n_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.n_experts = n_experts
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, partial: bool = False) -> torch.Tensor:
        """x [N, D], idx/weights [N, K] -> sum_k weights[:, k] · expert_{idx[:, k]}(x)  [N, D] (x's dtype).

        ``partial``: some choices are experts held elsewhere, marked -1 in ``idx`` (an expert
        shard's buffer, see :func:`dispatch_rows`); they are skipped. A row without a choice here
        gets zeros, and the graph (and a zero gradient) is kept when no row has one."""
        N, K = idx.shape
        if torch.compiler.is_compiling():  # data-independent shapes: each (row, choice) gathers its expert
            return self._gathered(x, idx, weights)
        if N == 1 and not (torch.is_grad_enabled() and self.gate_up_proj.requires_grad):
            return self._one_token(x, idx[0], weights[0])
        flat = idx.reshape(-1)
        if partial:
            pairs = (flat >= 0).nonzero().squeeze(1)
            if pairs.numel() == 0:
                return x * 0
            ids = flat.index_select(0, pairs)
            order = ids.argsort(stable=True)
            pairs, ids = pairs.index_select(0, order), ids.index_select(0, order)
        elif kernels.use_triton(x):  # permute, grouped FFN and weighted unpermute in Triton
            x_sorted, counts, order = kernels.moe_permute(x, idx, self.n_experts)
            return kernels.moe_unpermute(self.run_grouped(x_sorted, counts), order, weights, x.dtype)
        else:
            pairs = flat.argsort(stable=True)  # (row, choice) pairs grouped by expert
            ids = flat.index_select(0, pairs)
        token = pairs // K
        counts = torch.bincount(ids, minlength=self.n_experts)  # [E]
        y = self.run_grouped(x, counts, rows=token)  # [pairs, D]; the gather's backward is an index_add
        y = y * weights.reshape(-1).index_select(0, pairs).unsqueeze(-1).to(y.dtype)
        return torch.zeros_like(x).index_add_(0, token, y.to(x.dtype))

    def _gathered(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Each (row, choice) pair gathers its expert's weights: N·K batched one-row products, no sort.

        Measured on one bench-preset layer (bf16, 1 thread, compiled), ms at N = 1 / 4 / 16 rows:
        this 0.41 / 0.67 / 2.7, ``grouped_mm`` over sorted rows 0.68 / 1.2 / 4.9."""
        N, K = idx.shape
        dtype = compute_dtype(x)
        flat = idx.reshape(-1)  # [N*K]
        w13 = self.gate_up_proj.index_select(0, flat).to(dtype)  # [N*K, 2I, D]
        w2 = self.down_proj.index_select(0, flat).to(dtype)  # [N*K, D, I]
        xk = x.to(dtype).unsqueeze(1).expand(N, K, x.shape[-1]).reshape(N * K, 1, -1)  # [N*K, 1, D]
        gate, up = torch.bmm(xk, w13.transpose(1, 2)).chunk(2, dim=-1)  # [N*K, 1, I] each
        y = torch.bmm(F.silu(gate) * up, w2.transpose(1, 2))  # [N*K, 1, D]
        y = y.view(N, K, -1) * weights.to(y.dtype).unsqueeze(-1)
        return y.sum(dim=1).to(x.dtype)

    def _one_token(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Decode of one token without autograd: x [1, D] through its K experts, no sort or scatter."""
        dtype = compute_dtype(x)
        x = x.to(dtype)
        y = None
        for e, w in zip(ids.tolist(), weights.to(dtype).unbind(0)):
            if e < 0:  # held by another shard
                continue
            out = expert_ffn(x, self.gate_up_proj[e].to(dtype), self.down_proj[e].to(dtype)) * w
            y = out if y is None else y + out
        return y if y is not None else x * 0

    def run_grouped(
        self,
        x_sorted: torch.Tensor,
        counts: torch.Tensor,
        expert_ids: list[int] | None = None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the experts on their rows: x_sorted [M, D] holds counts[i] rows for expert_ids[i], in order.

        counts [n] (n = E when ``expert_ids`` is None, the experts in order). ``rows`` [M]: the rows are
        ``x_sorted[rows]`` instead (gathered here, straight into the padded blocks on the CPU). In bf16 one
        grouped GEMM per projection (``torch.nn.functional.grouped_mm``); otherwise a loop over experts.
        """
        dtype = compute_dtype(x_sorted)
        padded_here = dtype == torch.bfloat16 and GROUPED_MM is not None and x_sorted.device.type == "cpu"
        if rows is not None and not (padded_here and CPU_ROW_MULTIPLE > 1):  # gathered here only into padded blocks
            x_sorted, rows = x_sorted.index_select(0, rows), None
        w13, w2 = self.gate_up_proj, self.down_proj
        if expert_ids is not None:
            index = torch.tensor(expert_ids, device=w13.device)
            w13, w2 = w13.index_select(0, index), w2.index_select(0, index)
        # cast the stacked weights once (not once per expert under autocast)
        w13, w2 = w13.to(dtype), w2.to(dtype)
        if rows is None:
            x_sorted = x_sorted.to(dtype)
        if kernels.use_triton(x_sorted):  # one launch per GEMM, SwiGLU fused (raymoe.kernels.grouped_ffn)
            return kernels.grouped_swiglu(x_sorted, counts, w13, w2)
        if dtype == torch.bfloat16 and GROUPED_MM is not None:
            pad = CPU_ROW_MULTIPLE if x_sorted.device.type == "cpu" else 1
            if pad > 1:  # each expert's block rounded up to a multiple of `pad` rows, dropped after
                n = (x_sorted if rows is None else rows).shape[0]
                padded = (counts + pad - 1) // pad * pad
                pos = torch.arange(n, device=x_sorted.device) + torch.repeat_interleave(
                    padded.cumsum(0) - counts.cumsum(0) - (padded - counts), counts, output_size=n
                )
                if rows is None:  # zero rows
                    x_sorted = x_sorted.new_zeros(int(padded.sum()), x_sorted.shape[1]).index_copy(0, pos, x_sorted)
                else:  # row 0 (its outputs are dropped, so its gradients there are zeros)
                    src = rows.new_zeros(int(padded.sum())).index_copy_(0, pos, rows)
                    x_sorted = _GatherRows.apply(x_sorted, src, dtype)
                counts = padded
            offs = counts.cumsum(0).to(torch.int32)
            gate, up = GROUPED_MM(x_sorted, w13.transpose(-2, -1), offs=offs).chunk(2, dim=-1)
            y = GROUPED_MM(F.silu(gate) * up, w2.transpose(-2, -1), offs=offs)
            return y.index_select(0, pos) if pad > 1 else y
        return _ExpertLoop.apply(x_sorted, w13, w2, counts.tolist())


class _ExpertLoop(torch.autograd.Function):
    """The experts' SwiGLU over their row blocks, one pair of products per expert, with a written-out backward.

    x [M, D] holds ``sizes[e]`` rows for expert e in order; w13 [E, 2I, D], w2 [E, D, I]. Each product writes
    into one [M, ·] buffer, the SwiGLU and its backward run once over all M rows, and each expert's weight
    gradients go straight into the stacked [E, ...] gradients. The same products and elementwise kernels as
    autograd through ``expert_ffn`` per expert, to the bit (``tests/platform/test_model.py``), without that
    graph's backward copies: ``unbind``'s stacking the per-expert weight gradients, ``split``'s and
    ``chunk``'s concatenating the row and gate/up gradients. ``h = silu(gate) * up`` is recomputed in the
    backward, not saved. Measured on a 2-core AVX2 EPYC (2026-12-04, float32 bench preset): one layer's
    forward and backward 148.2 against 150.8 ms, the training step 1,033-1,040 against 1,025-1,030
    tokens/s and 30-60 MiB less peak memory. The torch profiler had put 10.5 % of the step's self time
    in those copies; their removal did not save that, so it was the profiler's attribution, not time."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, sizes: list[int]) -> torch.Tensor:  # noqa: ANN001
        inter = w2.shape[-1]
        gu = x.new_empty(x.shape[0], 2 * inter)
        blocks = _blocks(sizes)
        out = _rows_like(x, blocks, w2.shape[1])
        for e, a, b in blocks:
            torch.mm(x[a:b], w13[e].t(), out=gu[a:b])
        gate, up = gu.chunk(2, dim=-1)
        h = F.silu(gate) * up
        for e, a, b in blocks:
            torch.mm(h[a:b], w2[e].t(), out=out[a:b])
        ctx.save_for_backward(x, w13, w2, gu)
        ctx.blocks = blocks
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: ANN001
        x, w13, w2, gu = ctx.saved_tensors
        need_x, need_w13, need_w2 = ctx.needs_input_grad[:3]
        grad = grad.contiguous()
        gate, up = gu.chunk(2, dim=-1)
        act = F.silu(gate)
        dh = grad.new_empty(act.shape)
        for e, a, b in ctx.blocks:
            torch.mm(grad[a:b], w2[e], out=dh[a:b])
        grad_w2 = _stacked_grad(w2, ctx.blocks, lambda a, b: (act[a:b] * up[a:b]).t(), grad) if need_w2 else None
        dgu = torch.cat([torch.ops.aten.silu_backward(dh * up, gate), dh * act], dim=-1)
        grad_x = None
        if need_x:
            grad_x = _rows_like(x, ctx.blocks)
            for e, a, b in ctx.blocks:
                torch.mm(dgu[a:b], w13[e], out=grad_x[a:b])
        grad_w13 = _stacked_grad(w13, ctx.blocks, lambda a, b: x[a:b].t(), dgu) if need_w13 else None
        return grad_x, grad_w13, grad_w2, None


def _blocks(sizes: list[int]) -> list[tuple[int, int, int]]:
    """(expert, first row, end row) of each expert with rows, in order."""
    blocks, a = [], 0
    for e, n in enumerate(sizes):
        if n:
            blocks.append((e, a, a + n))
        a += n
    return blocks


def _rows_like(x: torch.Tensor, blocks: list, width: int | None = None) -> torch.Tensor:
    """An [M, width] (x's width by default) buffer the blocks fill: empty, or zeros where they leave rows over."""
    shape = (x.shape[0], x.shape[1] if width is None else width)
    return x.new_empty(shape) if blocks and blocks[-1][2] == x.shape[0] else x.new_zeros(shape)


def _stacked_grad(w: torch.Tensor, blocks: list, left, right: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    """w's gradient [E, out, in]: each expert's ``(left(a, b) @ right[a:b]).t()`` written into its slice, as
    autograd computes the gradient of ``w[e].t()`` (then transposes it); zeros for experts without rows."""
    g = w.new_empty(w.shape) if len(blocks) == w.shape[0] else w.new_zeros(w.shape)
    for e, a, b in blocks:
        torch.mm(left(a, b), right[a:b], out=g[e].t())
    return g


class _GatherRows(torch.autograd.Function):
    """``x.to(dtype)[src]``: rows cast before they are gathered (a quarter of the bytes when each row is
    chosen K = 4 times), with the backward's index_add in x's dtype (float32 sums of a row's K choices,
    as a gather of float32 rows has)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, src: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(src)
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return x.to(dtype).index_select(0, src)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # noqa: ANN001
        (src,) = ctx.saved_tensors
        return grad.new_zeros(ctx.x_shape, dtype=ctx.x_dtype).index_add_(0, src, grad.to(ctx.x_dtype)), None, None


def expert_ffn(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """One routed expert's SwiGLU: x [n, D] with its ``gate_up_proj`` [2I, D] and ``down_proj`` [D, I] -> [n, D]."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)


# one GEMM over all experts' row blocks (torch >= 2.10); its float32 backward fails on the CPU
# in torch 2.13, so it serves the bf16 path only
GROUPED_MM = getattr(F, "grouped_mm", None)

# On the CPU, grouped_mm runs one oneDNN GEMM per expert, and each new row count is a new primitive
# (created and JIT-compiled: 2.8 ms against 0.25 ms for a seen [m, 512] x [512, 512] bf16 product,
# Xeon with AMX, 2026-12-02). Routing, and the bias update, change every expert's row count every
# step; rounding them up to a multiple of this many rows makes the shapes repeat, so the primitive
# cache hits. The zero rows cost at most this many rows of work per expert, and change no output
# or gradient.
CPU_ROW_MULTIPLE = 64


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matrix products run in: autocast's when it is on, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class MoE(nn.Module):
    """A DeepSeekMoE layer's modules: the gate, the routed experts and the shared experts.

    Its forward is in :mod:`raymoe.platform.model.forward`, which pauses between the gate and
    the routed experts so that the caller answers them (this layer's ``experts``, or expert shards).

    Args:
        cfg: model config.
        seq_aux_alpha: weight of the sequence-wise balance loss (0 = off, the default).
        routed_experts: build the routed experts here (False on an attention stage of the actor graph).
    """

    def __init__(self, cfg: ModelConfig, seq_aux_alpha: float = 0.0, routed_experts: bool = True) -> None:
        super().__init__()
        self.n_experts = cfg.n_routed_experts
        self.top_k = cfg.num_experts_per_tok
        self.seq_aux_alpha = seq_aux_alpha
        self.gate = Gate(cfg)
        self.experts = (
            Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size) if routed_experts else None
        )
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts) if cfg.n_shared_experts else None
        )


def sequence_balance_loss(scores: torch.Tensor, idx: torch.Tensor, alpha: float) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss, averaged over sequences.

    L = α Σ_i f_i P_i with f_i = E/(K·S) · (tokens of the sequence routed to i) and
    P_i = mean over the sequence of s_i / Σ_j s_j. scores [B, S, E], idx [B, S, K].
    """
    B, S, E = scores.shape
    K = idx.shape[-1]
    counts = torch.zeros(B, E, device=scores.device).scatter_add_(
        1, idx.reshape(B, -1), torch.ones(B, S * K, device=scores.device)
    )
    f = counts * (E / (K * S))  # [B, E]
    p = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)  # [B, E]
    return alpha * (f * p).sum(dim=-1).mean()


# -- the MoE cut across actors: dispatch on the attention stage, experts on the shards ----------


def dispatch_rows(
    shard: torch.Tensor, local: torch.Tensor, weights: torch.Tensor, n_shards: int
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Which token rows go to which expert shard, each row once per shard with the experts it chose there.

    shard/local/weights [N, K]: per choice of the gate, the shard it goes to, the index of the chosen
    expert's copy among that shard's experts, and its gate weight (the placement's
    ``ExpertRouting.assign`` maps the gate's expert ids to the first two). Returns per shard
    ``(rows [n], local_ids [n, K], w [n, K])``: the rows that chose at least one expert on the shard,
    the local expert of each choice (-1 where the choice is on another shard) and its gate weight (0
    there; differentiable).
    """
    out = []
    for k in range(n_shards):
        here = shard == k
        rows = here.any(dim=1).nonzero().squeeze(1)
        mask = here.index_select(0, rows)
        local_ids = torch.where(mask, local.index_select(0, rows), -1)
        w = weights.index_select(0, rows) * mask
        out.append((rows, local_ids, w))
    return out


def combine_rows(rows: list[torch.Tensor], outputs: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """The routed experts' output of every row: each shard's weighted sums added back at its rows.

    rows/outputs per shard ([n_k] and [n_k, D], as :func:`dispatch_rows` sent them) -> like's shape [N, D]."""
    y = torch.zeros_like(like)
    for r, out in zip(rows, outputs):
        y.index_add_(0, r, out.to(y.dtype))
    return y
