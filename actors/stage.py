"""``AttentionStage``: the non-expert part of a contiguous range of layers, one replica of it.

A stage runs its layers for one micro-batch at a time, cut at every MoE layer: it computes
attention and routing, hands the driver one dispatch buffer per expert shard (each token row
once per shard, with the experts it chose there), and when the shards' outputs come back it
combines them with the shared experts and goes on to the next MoE layer. The forward of one
micro-batch is a Python generator paused at each dispatch; its autograd graph is cut into
segments at the same points, so the backward walks the segments in reverse, sending the
gradients of the shard outputs and receiving those of the dispatched rows and gate weights.

The model math is ``raymoe.platform.model``'s; this file only cuts it and keeps the state.
Every method returns plain tensors and dicts, so the class also runs without Ray (tests do).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from raymoe.actors.placement import Placement
from raymoe.platform.checkpoint.sharded import (
    OPTIMIZER_PREFIX,
    load_optimizer_state,
    optimizer_state_tensors,
    write_file,
)
from raymoe.platform.config import RaymoeConfig
from raymoe.platform.model.moe import MoE, compute_dtype, dispatch_rows, sequence_balance_loss
from raymoe.platform.model.transformer import IGNORE_INDEX, Block, StageModel, mtp_input_tokens, mtp_targets
from raymoe.platform.train.optim import build_optimizer, clip_and_step
from raymoe.platform.train.trainer import autocast_context

Buffer = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (rows x [n, D], local expert ids [n, K], weights [n, K])


@dataclass
class _Segment:
    """A piece of one micro-batch's graph between two cuts.

    ``leaf`` is its input (the previous piece's output, detached), ``losses`` the scaled loss
    terms computed in it, ``out`` the tensor the next piece continues from, and ``sent`` the
    (rows, gate weights) it dispatched to each shard at its end, still in the graph."""

    leaf: torch.Tensor | None
    losses: list[torch.Tensor] = field(default_factory=list)
    out: torch.Tensor | None = None
    rows: list[torch.Tensor] = field(default_factory=list)
    sent: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


@dataclass
class _Flight:
    """One micro-batch in flight on this stage."""

    train: bool
    scale: float
    segments: list[_Segment]
    gen: Generator | None = None
    mtp_leaf: torch.Tensor | None = None
    next_grad: torch.Tensor | None = None  # gradient of the pending dispatch's combined output


class GraphError(RuntimeError):
    """The actor graph cannot go on: an actor died, timed out or failed; the message names it."""


def set_threads(num_cpus: float = 0.0, peers: int = 1) -> int:
    """Torch threads of an actor: ``RAYMOE_ACTOR_THREADS``, else its CPU reservation, else its share of the cores.

    Ray sets OMP_NUM_THREADS=1 in an actor that reserves no CPU (the default here), which runs
    a colocated graph's matrix products on one core (measured on 2 cores: the whole model at
    half the local engine's speed). Giving every actor all cores is worse where actors compute
    at the same time: two expert shards with 2 OpenMP threads each on 2 cores took 5× longer
    than with 1 thread each (1.5 s against 0.3 s of a `small` step). So an actor takes the
    cores divided by ``peers``, the actors of its kind that run at once (replicas, shards)."""
    threads = os.environ.get("RAYMOE_ACTOR_THREADS")
    if threads:
        n = int(threads)
    elif num_cpus >= 1:
        n = int(num_cpus)
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        n = cores // max(peers, 1)
    torch.set_num_threads(max(n, 1))
    return torch.get_num_threads()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class _Collective:
    """Gradient all-reduce among the replicas of one stage (torch.distributed: gloo on CPU, NCCL on GPU)."""

    def setup(self, address: str, port: int, world: int, rank: int, timeout_s: float) -> None:
        import datetime

        import torch.distributed as dist

        if address in ("127.0.0.1", "localhost"):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(
            backend,
            init_method=f"tcp://{address}:{port}",
            world_size=world,
            rank=rank,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        self.world = world

    def node_address(self) -> tuple[str, int]:
        import ray

        return ray.util.get_node_ip_address(), free_port()

    @staticmethod
    def all_reduce_grads(params: list[torch.Tensor]) -> None:
        import torch.distributed as dist

        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


class AttentionStage(_Collective):
    """Replica ``replica`` of stage ``stage``: its layers' attention, norms, dense MLPs, gates and shared experts.

    Args:
        cfg: the run's config.
        placement: where every layer and expert lives.
        replica, stage: this actor's place in the dp × pp grid.
    """

    def __init__(self, cfg: RaymoeConfig, placement: Placement, replica: int, stage: int) -> None:
        set_threads(cfg.parallel.num_cpus_per_actor, peers=cfg.parallel.dp)
        self.cfg = cfg
        self.placement = placement
        self.replica, self.stage = replica, stage
        start, end = placement.stage_bounds[stage]
        self.first, self.last = stage == 0, stage == placement.pp - 1
        self.module = StageModel(cfg.model, start, end, self.first, self.last, cfg.train.seq_aux_alpha)
        self.module.init_weights(cfg.train.seed)
        self.module.train()
        self.params = [(n, p) for n, p in self.module.named_parameters()]
        self.optimizer = build_optimizer(self.params, cfg.train)
        self.ep = placement.ep
        self.world = 1
        self.moe: dict[int, MoE] = {}
        self.routing: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for block in self.module.blocks():
            if isinstance(block.mlp, MoE):
                layer = block.self_attn.layer_id
                self.moe[layer] = block.mlp
                self.routing[layer] = placement.routing(layer)
        self.flights: dict[Any, _Flight] = {}
        self.mtp_graphs: dict[Any, torch.Tensor] = {}
        self._reset_step()
        self._reset_eval()

    # -- bookkeeping ----------------------------------------------------------------------------

    def ready(self) -> dict:
        return {"pid": os.getpid(), "params": sum(p.numel() for _, p in self.params), "moe_layers": sorted(self.moe)}

    def _reset_step(self) -> None:
        E = self.cfg.model.n_routed_experts
        self.loads = {layer: torch.zeros(E) for layer in self.moe}
        self.stats: list[dict] = []
        self.aux_sum = 0.0
        self.compute_s = 0.0

    def _reset_eval(self) -> None:
        E = self.cfg.model.n_routed_experts
        self.eval_loads = {layer: torch.zeros(E) for layer in self.moe}
        self.eval_loss_sum = 0.0
        self.eval_tokens = 0

    def _timed(self, fn, *args, autocast: bool = True):  # noqa: ANN001, ANN202
        """Run ``fn`` (under bf16 autocast when configured and ``autocast``), adding its time to compute_s."""
        t0 = time.perf_counter()
        try:
            if not autocast:
                return fn(*args)
            with autocast_context(self.cfg.train.dtype, torch.device("cpu")):
                return fn(*args)
        finally:
            self.compute_s += time.perf_counter() - t0

    # -- forward --------------------------------------------------------------------------------

    def forward_begin(
        self,
        key: Any,
        batch: tuple[torch.Tensor, torch.Tensor],
        h_in: torch.Tensor | None = None,
        mtp_emb: torch.Tensor | None = None,
        scale: float = 1.0,
        train: bool = True,
    ) -> list:
        """Start micro-batch ``key``: run up to the first MoE dispatch (or to the end of the stage).

        Returns ep + 2 values: the ep dispatch buffers (None when the stage finished), then the
        stage's output (hidden states for the next stage; None on the last) and None."""
        leaf = None
        if h_in is not None and train:
            leaf = h_in.requires_grad_()
            h_in = leaf
        mtp_leaf = mtp_emb.requires_grad_() if (mtp_emb is not None and train) else mtp_emb
        fl = _Flight(train=train, scale=scale, segments=[_Segment(leaf=leaf)] if train else [], mtp_leaf=mtp_leaf)
        fl.gen = self._program(fl, batch[0], batch[1], h_in, mtp_leaf)
        self.flights[key] = fl
        return self._timed(self._advance, key, fl, None)

    def forward_resume(self, key: Any, *shard_outputs: torch.Tensor) -> list:
        """Combine the shards' outputs for the pending MoE layer and run on to the next dispatch."""
        fl = self.flights[key]
        return self._timed(self._advance, key, fl, list(shard_outputs))

    def _advance(self, key: Any, fl: _Flight, outs: list | None) -> list:
        grad_ctx = torch.enable_grad() if fl.train else torch.no_grad()
        with grad_ctx:
            try:
                bufs = fl.gen.send(outs) if outs is not None else next(fl.gen)
            except StopIteration as stop:
                fl.gen = None
                if not fl.train:
                    del self.flights[key]
                return [None] * self.ep + [stop.value, None]
        return [*bufs, None, None]

    def _program(
        self,
        fl: _Flight,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        h_in: torch.Tensor | None,
        mtp_emb: torch.Tensor | None,
    ) -> Generator[list[Buffer], list[torch.Tensor], torch.Tensor | None]:
        m = self.module
        h = m.model.embed_tokens(input_ids) if self.first else h_in
        S = input_ids.shape[1]
        rope_dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else h.dtype
        cos, sin = m.model.rotary_emb.cos[:S].to(rope_dtype), m.model.rotary_emb.sin[:S].to(rope_dtype)
        for block in m.model.layers.values():
            h = yield from self._block(fl, block, h, cos, sin)
        if not self.last:
            if fl.train:
                fl.segments[-1].out = h
            return h.detach()
        h = m.model.norm(h)
        main = F.cross_entropy(m.lm_head(h).float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
        tokens = int((labels != IGNORE_INDEX).sum())
        if not fl.train:
            self.eval_loss_sum += main.item() * tokens
            self.eval_tokens += tokens
            return None
        fl.segments[-1].losses.append(main * fl.scale)
        stats = {"main": main.item(), "tokens": tokens, "mtp": None}
        lam = self.cfg.train.mtp_lambda
        if len(m.model.mtp) and lam > 0:
            cos_m = m.model.rotary_emb.cos[:S].to(h.dtype)
            sin_m = m.model.rotary_emb.sin[:S].to(h.dtype)
            h_prev, losses = h, []
            depth = len(m.model.mtp)
            for k, module in enumerate(m.model.mtp.values(), start=1):
                emb = mtp_emb[k - 1] if mtp_emb is not None else m.model.embed_tokens(mtp_input_tokens(labels, k))
                h_k = module.combine(h_prev, emb)
                h_k = yield from self._block(fl, module, h_k, cos_m, sin_m)
                logits = m.lm_head(module.shared_head.norm(h_k)).float()
                loss_k = F.cross_entropy(
                    logits.flatten(0, 1), mtp_targets(labels, k).flatten(), ignore_index=IGNORE_INDEX
                )
                fl.segments[-1].losses.append(loss_k * (lam / depth * fl.scale))
                losses.append(loss_k.item())
                h_prev = h_k
            stats["mtp"] = sum(losses) / len(losses)
        self.stats.append(stats)
        return None

    def _block(
        self, fl: _Flight, block: Block, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> Generator[list[Buffer], list[torch.Tensor], torch.Tensor]:
        """One decoder layer (or an MTP module's block); a MoE layer pauses for its experts."""
        if not isinstance(block.mlp, MoE):
            out, _ = block(h, cos, sin)
            return out
        h_mid = h + block.self_attn(block.input_layernorm(h), cos, sin)
        x = block.post_attention_layernorm(h_mid)
        moe, layer = block.mlp, block.self_attn.layer_id
        B, S, D = x.shape
        flat = x.reshape(-1, D)
        weights, idx, scores = moe.gate(flat)
        counts = torch.bincount(idx.reshape(-1), minlength=moe.n_experts).float()
        (self.loads if fl.train else self.eval_loads)[layer] += counts
        if fl.train and moe.seq_aux_alpha > 0:
            aux = sequence_balance_loss(scores.view(B, S, -1), idx.view(B, S, -1), moe.seq_aux_alpha)
            fl.segments[-1].losses.append(aux * fl.scale)
            self.aux_sum += aux.item()
        parts = dispatch_rows(idx, weights, *self.routing[layer], self.ep)
        send_dtype = compute_dtype(flat)
        seg = fl.segments[-1] if fl.train else None
        bufs = []
        for rows, local_ids, w in parts:
            x_rows = flat.index_select(0, rows)
            if seg is not None:
                seg.rows.append(rows)
                seg.sent.append((x_rows, w))
            bufs.append((x_rows.detach().to(send_dtype), local_ids, w.detach()))
        outs = yield bufs
        y = torch.zeros_like(flat)
        for (rows, _, _), out in zip(parts, outs):
            y.index_add_(0, rows, out.to(flat.dtype))
        y = y.view(B, S, D)
        if moe.shared_experts is not None:
            y = y + moe.shared_experts(x)
        h_out = h_mid + y
        if seg is None:
            return h_out
        seg.out = h_out
        leaf = h_out.detach().requires_grad_()
        fl.segments.append(_Segment(leaf=leaf))
        return leaf

    def mtp_embed(self, key: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """First stage, pp > 1: the embeddings of the tokens the MTP modules combine, [depth, B, S, D]."""
        labels = batch[1]

        def run() -> torch.Tensor:
            emb = self.module.model.embed_tokens
            return torch.stack(
                [emb(mtp_input_tokens(labels, k)) for k in range(1, self.cfg.model.num_nextn_predict_layers + 1)]
            )

        with torch.enable_grad():
            out = self._timed(run)
        self.mtp_graphs[key] = out
        return out.detach()

    def mtp_embed_backward(self, key: Any, grad: torch.Tensor | None) -> None:
        out = self.mtp_graphs.pop(key)
        if grad is not None:
            self._timed(torch.autograd.backward, [out], [grad], autocast=False)

    # -- backward -------------------------------------------------------------------------------

    def backward_begin(self, key: Any, grad_out: torch.Tensor | None = None) -> list:
        """Backward of the last piece of micro-batch ``key`` (from its losses, or from the next stage's gradient)."""
        fl = self.flights[key]
        seg = fl.segments[-1]
        roots = list(seg.losses)
        grads = [torch.ones_like(t) for t in seg.losses]
        if not self.last:
            roots.append(seg.out)
            grads.append(grad_out)
        return self._timed(self._backward, key, fl, roots, grads, autocast=False)

    def backward_resume(self, key: Any, *shard_grads: tuple[torch.Tensor, torch.Tensor]) -> list:
        """Backward of the piece that ends at the pending dispatch, given the shards' gradients of its rows."""
        fl = self.flights[key]
        seg = fl.segments[-1]
        roots, grads = list(seg.losses), [torch.ones_like(t) for t in seg.losses]
        roots.append(seg.out)
        grads.append(fl.next_grad)
        for (x_rows, w), (gx, gw) in zip(seg.sent, shard_grads):
            roots += [x_rows, w]
            grads += [gx.to(x_rows.dtype), gw.to(w.dtype)]
        return self._timed(self._backward, key, fl, roots, grads, autocast=False)

    def _backward(self, key: Any, fl: _Flight, roots: list, grads: list) -> list:
        pairs = [(r, g) for r, g in zip(roots, grads) if r is not None and r.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([r for r, _ in pairs], [g for _, g in pairs])
        seg = fl.segments.pop()
        if fl.segments:  # hand the gradients of the previous dispatch's outputs to the shards
            g = seg.leaf.grad
            fl.next_grad = g
            flat = g.reshape(-1, g.shape[-1])
            return [flat.index_select(0, rows) for rows in fl.segments[-1].rows] + [None, None]
        del self.flights[key]
        grad_in = seg.leaf.grad if seg.leaf is not None else None
        grad_mtp = fl.mtp_leaf.grad if fl.mtp_leaf is not None and fl.mtp_leaf.requires_grad else None
        return [None] * self.ep + [grad_in, grad_mtp]

    # -- the optimizer step ---------------------------------------------------------------------

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
        out = {
            "sumsq": sumsq,
            "loads": {layer: c.clone() for layer, c in self.loads.items()},
            "stats": list(self.stats),
            "aux": self.aux_sum,
            "compute_s": self.compute_s,
            "in_flight": len(self.flights),
        }
        return out

    def apply_step(self, lr: float, clip_coef: float, biases: dict[int, torch.Tensor]) -> None:
        """Clip by the global coefficient, step AdamW at ``lr``, set the gates' new biases."""
        t0 = time.perf_counter()
        clip_and_step([p for _, p in self.params], self.optimizer, lr, clip_coef)
        self.set_biases(biases)
        self._reset_step()
        self.compute_s = time.perf_counter() - t0  # counted in the next step's report

    @torch.no_grad()
    def set_biases(self, biases: dict[int, torch.Tensor]) -> None:
        for layer, b in biases.items():
            if layer in self.moe:
                self.moe[layer].gate.e_score_correction_bias.copy_(b)

    def eval_result(self) -> dict:
        """Loss sum, token count and loads of the evaluation since the last call."""
        out = {"loss_sum": self.eval_loss_sum, "tokens": self.eval_tokens, "loads": dict(self.eval_loads)}
        self._reset_eval()
        return out

    # -- checkpoints ----------------------------------------------------------------------------

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Parameters, gate biases and AdamW state, by their full-model names."""
        out = {k: v for k, v in self.module.state_dict().items()}
        out.update(optimizer_state_tensors(self.params, self.optimizer))
        return out

    def save(self, directory: str, filename: str) -> tuple[str, list[str]]:
        """Write this stage's tensors into ``directory/filename`` (replica 0 only; the replicas are equal)."""
        return filename, write_file(directory, filename, self.state_tensors())

    def load(self, path: str) -> None:
        """Restore parameters, biases and optimizer state from a checkpoint of any layout."""
        from raymoe.platform.checkpoint.training import read_training_tensors

        state_names = list(self.module.state_dict())
        wanted = state_names + [
            f"{OPTIMIZER_PREFIX}{n}.{k}" for n, _ in self.params for k in ("exp_avg", "exp_avg_sq", "step")
        ]
        tensors = read_training_tensors(path, wanted, self.cfg.model, optional=lambda n: n.startswith(OPTIMIZER_PREFIX))
        missing = [n for n in state_names if n not in tensors]
        if missing:
            raise GraphError(f"checkpoint {path} lacks {missing[0]} (stage {self.stage})")
        self.module.load_state_dict({n: tensors[n] for n in state_names}, strict=True)
        load_optimizer_state(self.params, self.optimizer, tensors)
