"""The one forward of DeepSeek-V3 over flat token rows, and the training loss; every path runs it.

A forward is a *program*: a generator over the layers of a model (or a part of one, see
:class:`~raymoe.platform.model.transformer.DeepseekV3`) that pauses at every MoE layer with an
:class:`ExpertCall` (the normalized rows, the experts each chose and their weights) and resumes
with the routed experts' weighted sum. Whoever runs the program answers the calls:

- :func:`drive` with :func:`local_experts`: the model's own experts, in this process (training,
  logits, the serving engine's local runner; also ``torch.compile``'d as one graph);
- an attention stage of the actor graph: it sends the rows to the expert shards and resumes with
  their outputs.

The rows' attention context (:mod:`raymoe.platform.model.attention`) says where their keys are:
B whole sequences (training: the naive path) or a paged latent cache (serving). :class:`Hooks`
let the caller see the routing (expert loads, analysis), take each sequence-wise balance loss
where it is computed, and cut the autograd graph after each MoE layer (the graph's backward).

Shape legend: N rows, D hidden, K experts per token, V vocabulary, B sequences, S tokens each.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.nn.functional as F

from raymoe.platform.model.attention import Attention, CausalAttention
from raymoe.platform.model.moe import MoE, compute_dtype, sequence_balance_loss
from raymoe.platform.model.transformer import Block, DeepseekV3, MTPModule

IGNORE_INDEX = -100
T = TypeVar("T")


@dataclass
class ExpertCall:
    """A program's pause at MoE layer ``layer``: rows ``x`` [N, D] go to experts ``idx`` [N, K] with ``weights``."""

    layer: int
    x: torch.Tensor
    idx: torch.Tensor
    weights: torch.Tensor  # [N, K] float32


Program = Generator[ExpertCall, torch.Tensor, T]


class Hooks:
    """What the caller of a program sees at its cut points; the defaults change nothing."""

    def route(self, layer: int, idx: torch.Tensor, weights: torch.Tensor, scores: torch.Tensor) -> None:
        """The gate of ``layer`` chose ``idx`` [N, K] with ``weights`` [N, K]; ``scores`` [N, E] are the affinities."""

    def aux_loss(self, loss: torch.Tensor) -> None:
        """A sequence-wise balance loss term, computed now (training with ``seq_aux_alpha > 0``)."""

    # whether :meth:`predicted` must be called: the training loss then takes each row's argmax too
    wants_predictions: bool = False

    def predicted(self, depth: int, tokens: torch.Tensor) -> None:
        """The argmax tokens [N] of the head's logits at ``depth`` (0: the main model, k: MTP depth k) in
        :func:`loss_program`, computed now, when :attr:`wants_predictions`."""

    def loss_term(self, loss: torch.Tensor, weight: float) -> None:
        """A term of the objective (main or an MTP depth), computed now, and its weight in :func:`total_loss`."""

    def cut(self, h: torch.Tensor) -> torch.Tensor:
        """The hidden rows after a MoE layer; the program goes on from what this returns."""
        return h


NO_HOOKS = Hooks()


@dataclass
class LossOutput:
    """Losses of one training forward; ``loss`` is what backward runs on."""

    loss: torch.Tensor
    main_loss: torch.Tensor
    mtp_loss: torch.Tensor | None
    aux_loss: torch.Tensor | None
    tokens: int
    mtp_losses: list[torch.Tensor] = field(default_factory=list)  # per depth


def total_loss(main: torch.Tensor, mtp: list[torch.Tensor], aux: list[torch.Tensor], mtp_lambda: float) -> torch.Tensor:
    """DeepSeek-V3's training objective: main + λ · mean over depths of the MTP losses + the balance losses."""
    total = main
    if mtp:
        total = total + mtp_lambda * torch.stack(mtp).mean()
    if aux:
        total = total + torch.stack(aux).sum()
    return total


# --------------------------------------------------------------------------- running a program


def drive(program: Program[T], experts: Callable[[ExpertCall], torch.Tensor]) -> T:
    """Run ``program`` to its end, answering each :class:`ExpertCall` with ``experts(call)``."""
    try:
        call = next(program)
        while True:
            call = program.send(experts(call))
    except StopIteration as stop:  # .args, not .value: torch.compile (2.13) traces only the former
        return stop.args[0] if stop.args else None


def local_experts(part: DeepseekV3) -> Callable[[ExpertCall], torch.Tensor]:
    """Answer a program's expert calls with the part's own routed experts."""
    moe = part.moe_by_layer()

    def answer(call: ExpertCall) -> torch.Tensor:
        return moe[call.layer].experts(call.x, call.idx, call.weights)

    return answer


# --------------------------------------------------------------------------- programs


def rope(part: DeepseekV3, positions: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [N, R/2] of the rows' positions, in the dtype the products run in (computed once a forward)."""
    rotary = part.model.rotary_emb
    dtype = compute_dtype(like)
    return rotary.cos[positions].to(dtype), rotary.sin[positions].to(dtype)


@dataclass
class _Pending:
    """A MoE layer between its gate and its experts: the residual, the normalized rows and the call."""

    h: torch.Tensor
    x: torch.Tensor
    call: ExpertCall


def block_begin(
    block: Block, h: torch.Tensor, ctx: Attention, cos: torch.Tensor, sin: torch.Tensor, hooks: Hooks = NO_HOOKS
) -> tuple[torch.Tensor | None, _Pending | None]:
    """A decoder layer up to its routed experts: (output rows [N, D], None) for a dense layer, or
    (None, the pending MoE layer) whose :class:`ExpertCall` the caller answers, then :func:`block_end`."""
    h, x, gate = _regions(block)[0](block, h, ctx, cos, sin)
    if gate is None:
        return h, None
    weights, idx, scores = gate
    moe = block.mlp
    hooks.route(block.layer_id, idx, weights, scores)
    if moe.seq_aux_alpha > 0 and torch.is_grad_enabled() and ctx.sequences is not None:
        B, S = ctx.sequences
        hooks.aux_loss(sequence_balance_loss(scores.view(B, S, -1), idx.view(B, S, -1), moe.seq_aux_alpha))
    return None, _Pending(h, x, ExpertCall(block.layer_id, x, idx, weights))


def block_end(block: Block, pending: _Pending, y: torch.Tensor, hooks: Hooks = NO_HOOKS) -> torch.Tensor:
    """A MoE layer after its routed experts: y [N, D] (their weighted sum) plus the shared experts, residual."""
    return hooks.cut(_regions(block)[1](block, pending.h, pending.x, y))


def attend(
    block: Block, h: torch.Tensor, ctx: Attention, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]:
    """A layer's dense part before its routed experts: attention and its residual, the second norm and
    the dense MLP or the gate. -> (rows h, None, None) for a dense layer (its output), or (h, normed
    rows x, the gate's (weights, ids, affinities)) for a MoE layer."""
    h = h + block.self_attn(block.input_layernorm(h), cos, sin, ctx)
    x = block.post_attention_layernorm(h)
    if not isinstance(block.mlp, MoE):
        return h + block.mlp(x), None, None
    return h, x, block.mlp.gate(x)


def finish(block: Block, h: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A MoE layer's dense part after its routed experts y [N, D]: the shared experts of x, the residual h."""
    moe = block.mlp
    if moe.shared_experts is not None:
        y = y + moe.shared_experts(x)
    return h + y.to(h.dtype)


# the dense parts of a block as torch.compile'd regions (``Block.compiled``, set by :func:`compile_regions`):
# one compiled function each for every block of every model; its graphs do not depend on the block's
# identity, only on its structure and the shapes (nn modules are inlined, their parameters are inputs)
_COMPILED: dict[str, Callable] = {}


def _regions(block: Block) -> tuple[Callable, Callable]:
    # compiled for training steps only: evaluation (no grad) and a region traced inside another compiled
    # graph run as written, so each block compiles for its kind (dense or MoE) and the step's shapes
    if not block.compiled or not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return attend, finish
    if not _COMPILED:
        _COMPILED.update(attend=torch.compile(attend), finish=torch.compile(finish))
    return _COMPILED["attend"], _COMPILED["finish"]


def compile_regions(part: DeepseekV3, enabled: bool = True) -> None:
    """Run each block's dense parts (:func:`attend`, :func:`finish`) through ``torch.compile`` (``train.compile``).

    Inductor fuses the norms, RoPE, casts, residual adds, the gate's routing and the SwiGLU
    elementwise work of a block; the routed experts (data-dependent row counts) stay eager. Forwards
    without autograd (evaluation) run eagerly. The first training step of each new shape compiles,
    once per process."""
    for block in part.blocks():
        block.compiled = enabled


# The programs below drive blocks with block_begin/block_end, not with ``yield from`` a generator per
# block: torch.compile (2.13) loses the value a ``yield from`` returns, and these programs are compiled.


def main_program(
    part: DeepseekV3,
    ctx: Attention,
    tokens: torch.Tensor | None = None,
    hidden: torch.Tensor | None = None,
    hooks: Hooks = NO_HOOKS,
) -> Program[torch.Tensor]:
    """The part's main layers over flat rows: from ``tokens`` [N] (first part) or ``hidden`` [N, D].

    Returns the hidden rows [N, D], final-normed on the last part."""
    h = part.model.embed_tokens(tokens) if part.first else hidden
    cos, sin = rope(part, ctx.positions, h)
    for block in part.main_blocks():
        out, pending = block_begin(block, h, ctx, cos, sin, hooks)
        if pending is not None:
            y = yield pending.call
            out = block_end(block, pending, y, hooks)
        h = out
    return part.model.norm(h) if part.last else h


def mtp_program(
    module: MTPModule,
    part: DeepseekV3,
    h_prev: torch.Tensor,
    emb_next: torch.Tensor,
    ctx: Attention,
    hooks: Hooks = NO_HOOKS,
) -> Program[torch.Tensor]:
    """One MTP depth over flat rows: combine h_prev [N, D] with the embeddings of the next tokens, one block.

    Returns the module's hidden rows [N, D] (before its ``shared_head.norm``)."""
    h = module.combine(h_prev, emb_next)
    cos, sin = rope(part, ctx.positions, h)
    out, pending = block_begin(module, h, ctx, cos, sin, hooks)
    if pending is not None:
        y = yield pending.call
        out = block_end(module, pending, y, hooks)
    return out


def head(part: DeepseekV3, h: torch.Tensor, norm: torch.nn.Module | None = None) -> torch.Tensor:
    """Float32 logits [N, V] of hidden rows h [N, D] (through ``norm`` first, e.g. an MTP module's own)."""
    return part.lm_head(norm(h) if norm is not None else h).float()


def head_loss(
    part: DeepseekV3,
    h: torch.Tensor,
    labels: torch.Tensor,
    depth: int,
    norm: torch.nn.Module | None = None,
    hooks: Hooks = NO_HOOKS,
) -> torch.Tensor:
    """Mean cross-entropy of :func:`head`'s logits of h [N, D] against labels [N] (-100 = ignore), by
    :func:`linear_cross_entropy`, which never holds the [N, V] logits; hooks that want the predicted
    tokens (``Hooks.wants_predictions``) get each row's argmax from the same chunks."""
    x = norm(h) if norm is not None else h
    if not hooks.wants_predictions:
        return linear_cross_entropy(x, part.lm_head.weight, labels)
    loss, tokens = linear_cross_entropy(x, part.lm_head.weight, labels, predict=True)
    hooks.predicted(depth, tokens)
    return loss


# rows of logits a chunk of linear_cross_entropy holds at once: this many elements (float32, 8 MiB)
LOSS_CHUNK_ELEMENTS = 1 << 21
LOSS_MIN_CHUNK_ROWS = 64


def linear_cross_entropy(
    x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, predict: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``F.cross_entropy(F.linear(x, weight).float(), labels, ignore_index=-100)`` without the logits.

    x [N, D], weight [V, D] (the head's; float32 master weights under autocast), labels [N]. The
    rows go through in chunks of about :data:`LOSS_CHUNK_ELEMENTS` logits: each chunk's logits
    (products in :func:`compute_dtype`, softmax in float32) give its share of the loss and, when a
    gradient is wanted, at once its gradient for x and weight (the weight's summed in float32), so
    the backward is a scaling. Peak memory is one chunk's logits instead of the whole [N, V] in
    two dtypes and their gradients. Mean over the rows not ignored; NaN when all are, as
    ``F.cross_entropy``. ``predict``: also return each row's argmax token [N]."""
    need = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    tokens = torch.empty(x.shape[0], dtype=torch.long, device=x.device) if predict else None
    loss = _LinearCrossEntropy.apply(x, weight, labels, compute_dtype(x), need, tokens)
    return (loss, tokens) if predict else loss


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, labels, dtype, need, tokens):  # noqa: ANN001, ANN205
        N, V = x.shape[0], weight.shape[0]
        w = weight.to(dtype)
        keep = labels != IGNORE_INDEX
        n = keep.sum()
        scale = 1.0 / n.clamp_min(1).to(torch.float32)  # d(mean)/d(row loss) of a row kept
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        grad_x = torch.empty(x.shape, dtype=dtype, device=x.device) if need and x.requires_grad else None
        grad_w = (
            torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if need and weight.requires_grad else None
        )
        rows = max(LOSS_MIN_CHUNK_ROWS, LOSS_CHUNK_ELEMENTS // max(V, 1))
        with torch.autocast(x.device.type, enabled=False):
            for s in range(0, N, rows):
                xc = x[s : s + rows].to(dtype)
                target, kept = labels[s : s + rows].clamp_min(0).unsqueeze(1), keep[s : s + rows]
                z = F.linear(xc, w).float()  # [c, V]
                lse = torch.logsumexp(z, dim=-1)
                total += ((lse - z.gather(1, target).squeeze(1)) * kept).sum()
                if tokens is not None:
                    torch.argmax(z, dim=-1, out=tokens[s : s + rows])
                if grad_x is None and grad_w is None:
                    continue
                g = z.sub_(lse.unsqueeze(1)).exp_()  # softmax: d(row loss)/dz = softmax - one_hot(target)
                g.scatter_add_(1, target, torch.full_like(target, -1, dtype=g.dtype))
                g = g.mul_((kept * scale).unsqueeze(1)).to(dtype)
                if grad_x is not None:
                    torch.mm(g, w, out=grad_x[s : s + rows])
                if grad_w is not None:
                    grad_w += torch.mm(g.t(), xc)
        ctx.save_for_backward(grad_x, grad_w)
        ctx.x_dtype, ctx.w_dtype = x.dtype, weight.dtype
        return total / n

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        grad_x, grad_w = ctx.saved_tensors
        if grad_x is not None:
            grad_x = (grad_x * grad_out.to(grad_x.dtype)).to(ctx.x_dtype)
        if grad_w is not None:
            grad_w = (grad_w * grad_out).to(ctx.w_dtype)
        return grad_x, grad_w, None, None, None, None


def loss_program(
    part: DeepseekV3,
    h: torch.Tensor,
    labels: torch.Tensor,
    ctx: CausalAttention,
    mtp_lambda: float,
    mtp_emb: torch.Tensor | None = None,
    hooks: Hooks = NO_HOOKS,
) -> Program[tuple[torch.Tensor, list[torch.Tensor]]]:
    """The last part's losses from its final-normed rows h [B*S, D] against labels [B, S] (-100 = ignore).

    Main cross-entropy, and with ``mtp_lambda > 0`` the MTP depths: depth k combines position i's
    hidden state of depth k-1 with the embedding of t_{i+k} = labels[i+k-1] and predicts
    t_{i+k+1} = labels[i+k]. ``mtp_emb`` [depth, B*S, D] are those embeddings when the embedding
    lives elsewhere (the first stage of the actor graph). Returns (main loss, MTP loss per depth)."""
    main = head_loss(part, h, labels.reshape(-1), 0, hooks=hooks)
    hooks.loss_term(main, 1.0)
    losses: list[torch.Tensor] = []
    modules = part.mtp_modules() if mtp_lambda > 0 else []
    h_prev = h
    for k, module in enumerate(modules, start=1):
        emb = mtp_emb[k - 1] if mtp_emb is not None else part.model.embed_tokens(mtp_input_tokens(labels, k))
        h_k = yield from mtp_program(module, part, h_prev, emb.reshape(h.shape[0], -1), ctx, hooks)
        losses.append(head_loss(part, h_k, mtp_targets(labels, k).reshape(-1), k, module.shared_head.norm, hooks))
        hooks.loss_term(losses[-1], mtp_lambda / len(modules))
        h_prev = h_k
    return main, losses


def mtp_embeddings(part: DeepseekV3, labels: torch.Tensor) -> torch.Tensor:
    """The embeddings the MTP depths combine, [depth, B*S, D] (computed on the part that holds the embedding)."""
    depth = part.cfg.num_nextn_predict_layers
    emb = part.model.embed_tokens
    return torch.stack([emb(mtp_input_tokens(labels, k)).reshape(labels.numel(), -1) for k in range(1, depth + 1)])


def _shift_left(x: torch.Tensor, k: int, fill: int) -> torch.Tensor:
    """x [B, S] shifted left by k along S, the last k positions set to ``fill``."""
    if k == 0:
        return x
    out = torch.full_like(x, fill)
    out[:, :-k] = x[:, k:]
    return out


def mtp_input_tokens(labels: torch.Tensor, k: int) -> torch.Tensor:
    """The tokens whose embeddings MTP depth k (1-based) combines: t_{i+k} = labels[i+k-1] (0 past the end)."""
    return _shift_left(labels, k - 1, fill=0).clamp_min(0)


def mtp_targets(labels: torch.Tensor, k: int) -> torch.Tensor:
    """What MTP depth k predicts at position i: t_{i+k+1} = labels[i+k] (ignored past the end)."""
    return _shift_left(labels, k, fill=IGNORE_INDEX)


# --------------------------------------------------------------------------- the whole model


def _check_ids(model: DeepseekV3, input_ids: torch.Tensor) -> None:
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {list(input_ids.shape)}")
    if input_ids.shape[1] > model.cfg.max_position_embeddings:
        raise ValueError(
            f"sequences of {input_ids.shape[1]} tokens reach beyond max_position_embeddings "
            f"({model.cfg.max_position_embeddings})"
        )


def logits(model: DeepseekV3, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits [B, S, V] (float32) of input_ids [B, S]: the main model over whole sequences, its own experts."""
    _check_ids(model, input_ids)
    B, S = input_ids.shape
    ctx = CausalAttention.of(B, S, input_ids.device)
    h = drive(main_program(model, ctx, tokens=input_ids.reshape(-1)), local_experts(model))
    return head(model, h).view(B, S, -1)


class _Collect(Hooks):
    """Hooks that keep the balance losses (and pass the routing and the predictions on to the caller's hooks)."""

    def __init__(self, inner: Hooks | None) -> None:
        self.inner = inner or NO_HOOKS
        self.aux: list[torch.Tensor] = []

    def route(self, layer, idx, weights, scores):  # noqa: ANN001, ANN201
        self.inner.route(layer, idx, weights, scores)

    @property
    def wants_predictions(self) -> bool:  # type: ignore[override]
        return self.inner.wants_predictions

    def predicted(self, depth: int, tokens: torch.Tensor) -> None:
        self.inner.predicted(depth, tokens)

    def aux_loss(self, loss: torch.Tensor) -> None:
        self.aux.append(loss)


def loss(
    model: DeepseekV3,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    mtp_lambda: float = 0.3,
    hooks: Hooks | None = None,
) -> LossOutput:
    """Training loss of the whole model (its own experts) on input_ids [B, S] against labels [B, S].

    Main cross-entropy + λ · mean over MTP depths (run only when λ > 0) + the sequence-wise balance
    losses when enabled; ``hooks`` see the routing (e.g. to count expert loads)."""
    _check_ids(model, input_ids)
    B, S = input_ids.shape
    ctx = CausalAttention.of(B, S, input_ids.device)
    collect = _Collect(hooks)

    def program() -> Program[tuple[torch.Tensor, list[torch.Tensor]]]:
        h = yield from main_program(model, ctx, tokens=input_ids.reshape(-1), hooks=collect)
        return (yield from loss_program(model, h, labels, ctx, mtp_lambda, hooks=collect))

    main, mtp = drive(program(), local_experts(model))
    return LossOutput(
        loss=total_loss(main, mtp, collect.aux, mtp_lambda),
        main_loss=main,
        mtp_loss=torch.stack(mtp).mean() if mtp else None,
        aux_loss=torch.stack(collect.aux).sum() if collect.aux else None,
        tokens=int((labels != IGNORE_INDEX).sum()),
        mtp_losses=mtp,
    )
