"""``Stage``: the non-expert part of a contiguous range of layers, one replica of it, training or serving.

A stage runs the model's one forward (:mod:`raymoe.platform.model.forward`) over its layers. The
program pauses at every MoE layer; the stage then hands the driver one
:class:`~raymoe.actors.messages.DispatchBuffer` per expert shard (each token row once per shard,
with the experts it chose there) and, when the shards' outputs come back, resumes the program
with their combined sum. A colocated stage (``dp = pp = ep = 1``) holds the routed experts too and
answers the program itself: the whole model in one actor, no transfers.

- **Training mode**: the stage holds AdamW state. The forward of a micro-batch keeps its autograd
  graph cut into segments at every MoE layer's output (the program's ``cut`` hook), so the
  backward walks the segments in reverse, sending the gradients of the shard outputs and
  receiving those of the dispatched rows and gate weights.
- **Inference mode** (serving): the stage holds the paged latent cache of its own layers; each
  engine step is one program over a :class:`~raymoe.platform.inference.batch.StepBatch`.

The stage loads its own share of a checkpoint (any layout, any location), tensor by tensor. Every
method returns plain tensors and typed objects, so the class also runs without Ray (tests do).
"""

from __future__ import annotations

import os
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

import torch

from raymoe.actors.messages import DispatchBuffer, InferInput, StageOutput, TrainInput
from raymoe.actors.placement import Placement
from raymoe.actors.runtime import GraphError, Parking, free_port, set_threads, this_node
from raymoe.platform.analysis.capture import RoutingRecorder
from raymoe.platform.checkpoint.layout import COLOCATED_FILE, OPTIMIZER_PREFIX, split_experts, stage_file
from raymoe.platform.checkpoint.reader import load_into, open_checkpoint
from raymoe.platform.checkpoint.sharded import load_optimizer_state, optimizer_state_tensors, write_part
from raymoe.platform.config import RaymoeConfig
from raymoe.platform.devices import host, resolve_device, tune_host_allocator
from raymoe.platform.inference.cache import BlockCache
from raymoe.platform.inference.runner import LiveCounts
from raymoe.platform.model.attention import CausalAttention
from raymoe.platform.model.forward import (
    IGNORE_INDEX,
    ExpertCall,
    Hooks,
    compile_regions,
    head,
    local_experts,
    loss_program,
    main_program,
    mtp_embeddings,
    mtp_program,
)
from raymoe.platform.model.moe import combine_rows, compute_dtype, dispatch_rows
from raymoe.platform.model.transformer import DeepseekV3
from raymoe.platform.train.balance import LoadCounter
from raymoe.platform.train.finetune import restrict
from raymoe.platform.train.optim import build_optimizer, clip_and_step
from raymoe.platform.train.trainer import autocast_context


@dataclass
class ServingSpec:
    """What an actor needs in inference mode: where the weights are, their dtype, the cache pool, the device."""

    checkpoint: str
    dtype: torch.dtype = torch.bfloat16
    num_blocks: int = 0
    block_size: int = 16
    device: str = "auto"  # auto | cpu | cuda, resolved in the actor's process


@dataclass
class _Segment:
    """A piece of one micro-batch's graph between two cuts.

    ``leaf`` is its input (the previous piece's output, detached), ``losses`` the scaled loss
    terms computed in it, ``out`` the tensor the next piece continues from, and ``rows``/``sent``
    the rows and (rows, gate weights) it dispatched to each shard at its end, still in the graph."""

    leaf: torch.Tensor | None
    losses: list[torch.Tensor] = field(default_factory=list)
    out: torch.Tensor | None = None
    rows: list[torch.Tensor] = field(default_factory=list)
    sent: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


@dataclass
class _Flight:
    """One program (a training micro-batch, or a serving step) in flight on this stage."""

    train: bool
    scale: float
    segments: list[_Segment]
    program: Generator | None = None
    pending: tuple[ExpertCall, list[torch.Tensor]] | None = None
    mtp_leaf: torch.Tensor | None = None
    next_grad: torch.Tensor | None = None  # gradient of the pending dispatch's combined output
    recorder: RoutingRecorder | None = None  # an evaluation that records the routing of this stage's layers
    key: Any = None


class _FlightHooks(Hooks):
    """The program's cut points, seen by the stage: loads counted, balance losses and graph cuts per segment."""

    def __init__(self, stage: Stage, fl: _Flight) -> None:
        self.stage, self.fl = stage, fl

    def route(self, layer, idx, weights, scores):  # noqa: ANN001, ANN201
        counter = self.stage.loads if self.fl.train else self.stage.eval_loads
        counter.route(layer, idx, weights, scores)
        if self.fl.recorder is not None:
            self.fl.recorder.route(layer, idx, weights, scores)

    @property
    def wants_predictions(self) -> bool:  # type: ignore[override]
        return self.fl.recorder is not None and self.fl.recorder.wants_predictions

    def predicted(self, depth: int, tokens: torch.Tensor) -> None:
        if self.fl.recorder is not None:
            self.fl.recorder.predicted(depth, tokens)

    def aux_loss(self, loss: torch.Tensor) -> None:
        if self.fl.train:
            self.fl.segments[-1].losses.append(loss * self.fl.scale)
            self.stage.aux_sum += loss.item()

    def loss_term(self, loss: torch.Tensor, weight: float) -> None:
        if self.fl.train:  # a root of the segment it was computed in
            self.fl.segments[-1].losses.append(loss * (weight * self.fl.scale))

    def cut(self, h: torch.Tensor) -> torch.Tensor:
        if not self.fl.train or self.stage.colocated:
            return h
        seg = self.fl.segments[-1]
        seg.out = h
        leaf = h.detach().requires_grad_()
        self.fl.segments.append(_Segment(leaf=leaf))
        return leaf


class Collective(Parking):
    """Gradient all-reduce among the replicas of one stage (torch.distributed: gloo on CPU, NCCL on GPU).

    Its own process group (:meth:`setup`), or, with the direct transport, whose collective group
    already made torch.distributed's world of all the graph's actors, a subgroup of that (:meth:`join`)."""

    world = 1
    group: Any = None  # the subgroup of the replicas (direct transport); None: the default group

    def setup(self, address: str, port: int, world: int, rank: int, timeout_s: float) -> None:
        import datetime

        import torch.distributed as dist

        if address in ("127.0.0.1", "localhost"):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend, init_method=f"tcp://{address}:{port}", world_size=world, rank=rank,
            timeout=datetime.timedelta(seconds=timeout_s),
        )  # fmt: skip
        self.world = world

    def join(self, ranks: list[int]) -> None:
        """The replicas' subgroup of the world the direct transport made (only its members call this)."""
        import torch.distributed as dist

        self.group = dist.new_group(ranks, use_local_synchronization=True)
        self.world = len(ranks)

    def node_address(self) -> tuple[str, int]:
        import ray

        return ray.util.get_node_ip_address(), free_port()

    def all_reduce_grads(self, params: list[torch.Tensor]) -> None:
        import torch.distributed as dist

        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self.group)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


class Stage(Collective):
    """Replica ``replica`` of stage ``stage``: its layers' attention, norms, dense MLPs, gates and shared experts.

    Args:
        cfg: the run's config (serving: the checkpoint's model with default training fields).
        placement: where every layer and expert lives.
        replica, stage: this actor's place in the dp × pp grid.
        colocated: the stage is the whole model with its routed experts (dp = pp = ep = 1).
        serving: inference mode (the weights, dtype, cache pool and device); None: training mode.
    """

    def __init__(
        self,
        cfg: RaymoeConfig,
        placement: Placement,
        replica: int,
        stage: int,
        colocated: bool = False,
        serving: ServingSpec | None = None,
    ) -> None:
        self.train_mode = serving is None
        if self.train_mode:
            tune_host_allocator()  # as the local trainer: large per-step tensors stay in the heap
        peers = cfg.parallel.dp if self.train_mode else 1  # serving stages take turns: each may use every core
        set_threads(cfg.parallel.num_cpus_per_actor if self.train_mode else 0.0, peers=peers)
        self.cfg, self.placement = cfg, placement
        self.replica, self.stage, self.colocated = replica, stage, colocated
        self.ep = 0 if colocated else placement.ep
        start, end = placement.stage_bounds[stage]
        self.first, self.last = start == 0, end == cfg.model.num_hidden_layers
        self.device = (
            resolve_device(serving.device, "device") if serving is not None else resolve_device(cfg.parallel.device)
        )
        dtype = serving.dtype if serving is not None else None
        self.part = DeepseekV3.empty(cfg.model, cfg.train.seq_aux_alpha, (start, end), routed_experts=colocated,
                                     device=self.device, dtype=dtype)  # fmt: skip
        source = serving.checkpoint if serving is not None else cfg.train.init_from
        if source:
            load_into(dict(self.part.state_dict()), open_checkpoint(source))
        else:
            self.part.init_weights(cfg.train.seed)
        self.params = list(self.part.named_parameters())
        self.routing = {layer: placement.routing(layer) for layer in self.part.moe_by_layer()} if not colocated else {}
        self.experts = local_experts(self.part) if colocated else None
        self.flights: dict[Any, _Flight] = {}
        self.mtp_graphs: dict[Any, torch.Tensor] = {}
        self.compute_s = 0.0
        if self.train_mode:
            self.part.train()
            compile_regions(self.part, cfg.train.compile)
            restrict(self.params, cfg)  # a fine-tune's frozen parameters (full: none)
            self.optimizer = build_optimizer(self.params, cfg.train)
            self._reset_step()
            self._reset_eval()
        else:
            self.part.eval()
            layers = [b.layer_id for b in self.part.blocks()]
            width = cfg.model.kv_lora_rank + cfg.model.qk_rope_head_dim
            self.cache = BlockCache(layers, serving.num_blocks, serving.block_size, width, serving.dtype, self.device)
        # serving: the tokens routed to each expert of this stage's layers (the runner's live re-placement reads them)
        self.counts = LiveCounts(self.part) if not self.train_mode and not colocated else None

    # -- bookkeeping ----------------------------------------------------------------------------

    @property
    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for _, p in self.params)

    def ready(self) -> dict:
        moe = sorted(self.part.moe_by_layer())
        return {"pid": os.getpid(), "params": sum(p.numel() for _, p in self.params), "param_bytes": self.param_bytes,
                "layers": [b.layer_id for b in self.part.blocks()], "moe_layers": moe,
                "compiled_layers": [b.layer_id for b in self.part.blocks() if b.compiled], **this_node()}  # fmt: skip

    def _reset_step(self) -> None:
        E = self.cfg.model.n_routed_experts
        self.loads = LoadCounter(sorted(self.part.moe_by_layer()), E)
        self.stats: list[dict] = []
        self.aux_sum = 0.0
        self.compute_s = 0.0

    def _reset_eval(self) -> None:
        E = self.cfg.model.n_routed_experts
        main = [layer for layer in sorted(self.part.moe_by_layer()) if layer < self.cfg.model.num_hidden_layers]
        self.eval_loads = LoadCounter(main, E)
        self.eval_loss_sum = 0.0
        self.eval_tokens = 0
        self.records: dict[Any, tuple] = {}  # key -> the routing a recording evaluation took (this stage's layers)

    def _timed(self, fn, *args, autocast: bool = True):  # noqa: ANN001, ANN202
        """Run ``fn`` (under bf16 autocast when training in bf16 and ``autocast``), adding its time to compute_s."""
        t0 = time.perf_counter()
        try:
            if not (autocast and self.train_mode):
                return fn(*args)
            with autocast_context(self.cfg.train.dtype, self.device):
                return fn(*args)
        finally:
            self.compute_s += time.perf_counter() - t0

    # -- forward --------------------------------------------------------------------------------

    def begin(
        self, key: Any, inputs: TrainInput | InferInput, prev: StageOutput | None = None, emb: Any = None
    ) -> list:
        """Start program ``key`` and run it to the first MoE dispatch (or to its end).

        ``prev`` is the previous stage's output (the main model's hidden rows for the MTP draft);
        ``emb`` the MTP embeddings made on the first stage when it is not this one. Returns ep + 1
        values: a DispatchBuffer per shard (None when finished), then the StageOutput (None until then)."""
        hidden = prev.hidden.to(self.device) if prev is not None and prev.hidden is not None else None
        if isinstance(inputs, InferInput):
            fl = _Flight(train=False, scale=1.0, segments=[])
            fl.program = self._serve_program(inputs, hidden, emb)
        else:
            train = inputs.train
            leaf = None
            if hidden is not None and train:
                leaf = hidden.requires_grad_()
                hidden = leaf
            emb = emb.to(self.device) if emb is not None else None
            mtp_leaf = emb.requires_grad_() if (emb is not None and train) else emb
            fl = _Flight(train=train, scale=inputs.scale, segments=[_Segment(leaf=leaf)] if train else [],
                         mtp_leaf=mtp_leaf)  # fmt: skip
            if inputs.record and not train:
                fl.recorder, fl.key = RoutingRecorder(self.part), key
            fl.program = self._train_program(fl, inputs, hidden, mtp_leaf)
        self.flights[key] = fl
        return self._timed(self._advance, key, fl, None)

    def resume(self, key: Any, *shard_outputs: torch.Tensor) -> list:
        """Combine the shards' outputs for the pending MoE layer and run on to the next dispatch."""
        fl = self.flights[key]
        call, rows = fl.pending
        y = combine_rows(rows, [o.to(self.device) for o in shard_outputs], call.x)
        return self._timed(self._advance, key, fl, y)

    def _advance(self, key: Any, fl: _Flight, answer: torch.Tensor | None) -> list:
        mode = torch.enable_grad() if fl.train else torch.inference_mode() if not self.train_mode else torch.no_grad()
        with mode:
            while True:
                try:
                    call = fl.program.send(answer)  # None starts the program
                except StopIteration as stop:
                    fl.program, fl.pending = None, None
                    if not fl.train:
                        del self.flights[key]
                    return [None] * self.ep + [stop.value]
                if self.experts is None:
                    break
                answer = self.experts(call)  # colocated: the stage's own experts
            shards, local = self.routing[call.layer].assign(call.idx)
            if self.counts is not None:
                self.counts.count(call)
            parts = dispatch_rows(shards, local, call.weights, self.ep)
            seg = fl.segments[-1] if fl.train else None
            send_dtype = compute_dtype(call.x)
            buffers = []
            for rows, local_ids, w in parts:
                x_rows = call.x.index_select(0, rows)
                if seg is not None:
                    seg.rows.append(rows)
                    seg.sent.append((x_rows, w))
                buffers.append(DispatchBuffer(call.layer, host(x_rows.detach().to(send_dtype)), host(local_ids),
                                              host(w.detach())))  # fmt: skip
            fl.pending = (call, [rows for rows, _, _ in parts])
            return [*buffers, None]

    def _train_program(
        self, fl: _Flight, inputs: TrainInput, hidden: torch.Tensor | None, mtp_emb: torch.Tensor | None
    ) -> Generator:
        """A micro-batch through this stage's layers (and, on the last, the losses)."""
        input_ids, labels = inputs.input_ids.to(self.device), inputs.labels.to(self.device)
        B, S = input_ids.shape
        ctx = CausalAttention.of(B, S, self.device)
        hooks = _FlightHooks(self, fl)
        tokens = input_ids.reshape(-1) if self.first else None
        h = yield from main_program(self.part, ctx, tokens=tokens, hidden=hidden, hooks=hooks)
        if not self.last:
            if fl.train:
                fl.segments[-1].out = h
            if fl.recorder is not None:
                self.records[fl.key] = fl.recorder.take()
            return StageOutput(hidden=host(h.detach()))
        # a recording evaluation runs the MTP modules too (any λ > 0; its loss is not used)
        lam = self.cfg.train.mtp_lambda if fl.train else 1.0 if fl.recorder is not None else 0.0
        main, mtp = yield from loss_program(self.part, h, labels, ctx, lam, mtp_emb, hooks)
        tokens_n = int((labels != IGNORE_INDEX).sum())
        if not fl.train:
            self.eval_loss_sum += main.item() * tokens_n
            self.eval_tokens += tokens_n
            if fl.recorder is not None:
                self.records[fl.key] = fl.recorder.take()
            return StageOutput()
        mtp_mean = sum(m.item() for m in mtp) / len(mtp) if mtp else None
        self.stats.append({"main": main.item(), "tokens": tokens_n, "mtp": mtp_mean})
        return StageOutput()

    def _serve_program(self, inputs: InferInput, hidden: torch.Tensor | None, emb: torch.Tensor | None) -> Generator:
        """One serving step through this stage's layers over its paged cache."""
        batch = inputs.batch if self.device.type == "cpu" else inputs.batch.to(self.device)
        ctx = batch.attention(self.cache.flat, self.cache.layer_base)
        if hidden is not None:
            hidden = hidden.to(self.device)
        if inputs.kind == "main":
            tokens = batch.tokens if self.first else None
            h = yield from main_program(self.part, ctx, tokens=tokens, hidden=hidden)
            if not self.last:
                return StageOutput(hidden=host(h))
            logits = head(self.part, h.index_select(0, inputs.logit_rows.to(self.device)))
            rows = inputs.hidden_rows
            hidden_rows = h.index_select(0, rows.to(self.device)) if rows is not None else None
            return StageOutput(hidden=host(hidden_rows), logits=host(logits))
        module = self.part.mtp_modules()[0]
        emb = emb.to(self.device) if emb is not None else self.part.model.embed_tokens(batch.tokens)
        h = yield from mtp_program(module, self.part, hidden, emb, ctx)
        return StageOutput(logits=host(head(self.part, h.index_select(0, inputs.logit_rows.to(self.device)),
                                            module.shared_head.norm)))  # fmt: skip

    @torch.inference_mode()
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """First stage: the embeddings of ``tokens`` (the MTP draft's input when it sits on another stage)."""
        return host(self.part.model.embed_tokens(tokens.to(self.device)))

    def mtp_embed(self, key: Any, inputs: TrainInput) -> torch.Tensor:
        """First stage, pp > 1: the embeddings of the tokens the MTP modules combine, [depth, b*S, D]."""
        if not inputs.train:  # a recording evaluation: no graph to keep
            with torch.no_grad():
                return host(self._timed(mtp_embeddings, self.part, inputs.labels.to(self.device)))
        with torch.enable_grad():
            out = self._timed(mtp_embeddings, self.part, inputs.labels.to(self.device))
        self.mtp_graphs[key] = out
        return host(out.detach())

    def mtp_embed_backward(self, key: Any, grad: torch.Tensor | None) -> None:
        out = self.mtp_graphs.pop(key)
        if grad is not None and out.requires_grad:  # a fine-tune's frozen embeddings: nothing to reach
            self._timed(torch.autograd.backward, [out], [grad.to(out)], autocast=False)

    # -- backward (training) --------------------------------------------------------------------

    def backward_begin(self, key: Any, grad_out: torch.Tensor | None = None) -> list:
        """Backward of the last piece of micro-batch ``key`` (from its losses, or from the next stage's gradient)."""
        fl = self.flights[key]
        seg = fl.segments[-1]
        roots, grads = list(seg.losses), [torch.ones_like(t) for t in seg.losses]
        if not self.last:
            roots.append(seg.out)
            grads.append(grad_out.to(seg.out) if grad_out is not None else None)
        return self._timed(self._backward, key, fl, roots, grads, autocast=False)

    def backward_resume(self, key: Any, *shard_grads: Any) -> list:
        """Backward of the piece that ends at the pending dispatch, given the shards' ExpertGrads of its rows."""
        fl = self.flights[key]
        seg = fl.segments[-1]
        roots, grads = list(seg.losses), [torch.ones_like(t) for t in seg.losses]
        roots.append(seg.out)
        grads.append(fl.next_grad)
        for (x_rows, w), g in zip(seg.sent, shard_grads):
            roots += [x_rows, w]
            grads += [g.x.to(x_rows), g.weights.to(w)]
        return self._timed(self._backward, key, fl, roots, grads, autocast=False)

    def _backward(self, key: Any, fl: _Flight, roots: list, grads: list) -> list:
        pairs = [(r, g) for r, g in zip(roots, grads) if r is not None and r.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([r for r, _ in pairs], [g for _, g in pairs])
        seg = fl.segments.pop()
        if fl.segments:  # hand the gradients of the previous dispatch's outputs to the shards
            g = seg.leaf.grad
            fl.next_grad = g
            return [host(g.index_select(0, rows)) for rows in fl.segments[-1].rows] + [None, None]
        del self.flights[key]
        grad_in = seg.leaf.grad if seg.leaf is not None else None
        grad_mtp = fl.mtp_leaf.grad if fl.mtp_leaf is not None and fl.mtp_leaf.requires_grad else None
        return [None] * self.ep + [host(grad_in), host(grad_mtp)]

    # -- the optimizer step (training) ----------------------------------------------------------

    def finish(self) -> dict:
        """After the step's backward: reduce gradients across replicas; report what the driver needs.

        Returns the squared gradient norm of this stage's parameters (counted once, on replica
        0), the expert loads of its MoE layers, the loss statistics and the compute time."""
        t0 = time.perf_counter()
        params = [p for _, p in self.params]
        if self.world > 1:
            self.all_reduce_grads(params)
        sumsq = 0.0
        if self.replica == 0:
            grads = [p.grad for p in params if p.grad is not None]
            if grads:
                sumsq = float(sum(torch.linalg.vector_norm(g.float()) ** 2 for g in grads))
        self.compute_s += time.perf_counter() - t0
        return {"sumsq": sumsq, "loads": self.loads.loads(), "layers": sorted(self.loads.index),
                "stats": list(self.stats), "aux": self.aux_sum, "compute_s": self.compute_s,
                "in_flight": len(self.flights), "sent_bytes": self.sent_bytes()}  # fmt: skip

    def apply_step(self, lr: float, clip_coef: float, biases: dict[int, torch.Tensor]) -> None:
        """Clip by the global coefficient, step AdamW at ``lr``, set the gates' new biases."""
        t0 = time.perf_counter()
        clip_and_step([p for _, p in self.params], self.optimizer, lr, clip_coef)
        self.set_biases(biases)
        self._reset_step()
        self.compute_s = time.perf_counter() - t0  # counted in the next step's report

    @torch.no_grad()
    def set_biases(self, biases: dict[int, torch.Tensor]) -> None:
        moe = self.part.moe_by_layer()
        for layer, b in biases.items():
            if layer in moe:
                moe[layer].gate.e_score_correction_bias.copy_(b)

    def biases(self) -> dict[int, torch.Tensor]:
        """The gates' biases by MoE layer."""
        return {layer: m.gate.e_score_correction_bias.detach().float().cpu()
                for layer, m in self.part.moe_by_layer().items()}  # fmt: skip

    def expert_loads(self) -> dict:
        """Serving: the tokens routed to each expert of this stage's MoE layers since the start
        (:meth:`~raymoe.platform.inference.runner.LiveCounts.to_dict`)."""
        return self.counts.to_dict()

    def set_placement(self, placement: Placement) -> None:
        """Route this stage's MoE layers by a new placement (the shards hold its experts already)."""
        if placement.moe_layers != self.placement.moe_layers or placement.stage_bounds != self.placement.stage_bounds:
            raise GraphError(f"stage {self.stage}: a new placement may move experts only, not layers")
        self.placement = placement
        self.routing = {layer: placement.routing(layer) for layer in self.part.moe_by_layer()}

    def eval_result(self) -> dict:
        """Loss sum, token count, loads and recorded routing (by key) of the evaluation since the last call."""
        out = {"loss_sum": self.eval_loss_sum, "tokens": self.eval_tokens, "loads": self.eval_loads.loads(),
               "layers": sorted(self.eval_loads.index), "records": self.records}  # fmt: skip
        self._reset_eval()
        return out

    # -- checkpoints ----------------------------------------------------------------------------

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Parameters, gate biases and AdamW state, by their full-model names (routed experts one by one)."""
        out = dict(self.part.state_dict())
        if self.train_mode:
            out.update(optimizer_state_tensors(self.params, self.optimizer))
        return split_experts(out)

    def save(self, directory: str) -> tuple[str, list[str]]:
        """Write this stage's tensors into ``directory`` (replica 0 only; the replicas are equal)."""
        filename = COLOCATED_FILE if self.colocated else stage_file(self.stage)
        return write_part(directory, filename, self.state_tensors())

    def load(self, path: str) -> None:
        """Restore parameters, biases and optimizer state from a training checkpoint of any layout."""
        reader = open_checkpoint(path)
        optim = {f"{OPTIMIZER_PREFIX}{n}.{k}": (torch.zeros(()) if k == "step" else torch.empty_like(p.data))
                 for n, p in self.params for k in ("exp_avg", "exp_avg_sq", "step")}  # fmt: skip
        try:
            absent = load_into({**dict(self.part.state_dict()), **optim}, reader,
                               optional=lambda n: n.startswith(OPTIMIZER_PREFIX))  # fmt: skip
        except ValueError as exc:
            raise GraphError(f"stage {self.stage} cannot load {path}: {exc}") from exc
        load_optimizer_state(self.params, self.optimizer, {k: v for k, v in optim.items() if k not in absent})
