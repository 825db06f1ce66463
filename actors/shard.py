"""``Shard``: the routed experts a placement gives one expert shard, for every MoE layer, training or serving.

For each (MoE layer, program) the shard receives one :class:`~raymoe.actors.messages.DispatchBuffer`
per attention replica, runs its experts on all of them at once (one grouped pass of
:class:`~raymoe.platform.model.moe.Experts`, the model's own), and returns each replica its rows'
weighted outputs. In training the backward mirrors it and returns each replica the gradients of its
rows and gate weights; expert gradients accumulate over the step's micro-batches, then the driver
asks for the squared gradient norm and steps every shard. A shard takes part in every step, also
with zero rows. It loads its own experts from a checkpoint of any layout, expert by expert.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from torch import nn

from raymoe.actors.messages import DispatchBuffer, ExpertGrads
from raymoe.actors.placement import Placement
from raymoe.actors.runtime import GraphError, Parking, set_threads, this_node
from raymoe.actors.stage import ServingSpec
from raymoe.platform.checkpoint.layout import OPTIMIZER_PREFIX, experts_file, split_experts
from raymoe.platform.checkpoint.reader import load_into, open_checkpoint
from raymoe.platform.checkpoint.sharded import load_optimizer_state, optimizer_state_tensors, write_part
from raymoe.platform.config import RaymoeConfig
from raymoe.platform.devices import host, resolve_device, tune_host_allocator
from raymoe.platform.model.moe import Experts
from raymoe.platform.model.transformer import init_parameter_, moe_prefix
from raymoe.platform.train.finetune import restrict
from raymoe.platform.train.optim import build_optimizer, clip_and_step
from raymoe.platform.train.trainer import autocast_context


class Shard(Parking):
    """Expert shard ``shard`` of ``placement.ep``.

    Args:
        cfg: the run's config.
        placement: where every layer and expert lives.
        shard: this shard's index.
        serving: inference mode (weights, dtype, device); None: training mode.
    """

    def __init__(self, cfg: RaymoeConfig, placement: Placement, shard: int, serving: ServingSpec | None = None):
        self.train_mode = serving is None
        if self.train_mode:
            tune_host_allocator()  # as the local trainer: large per-step tensors stay in the heap
        set_threads(cfg.parallel.num_cpus_per_actor if self.train_mode else 0.0, peers=placement.ep)
        self.cfg, self.placement, self.shard = cfg, placement, shard
        self.device = (
            resolve_device(serving.device, "device") if serving is not None else resolve_device(cfg.parallel.device)
        )
        m = cfg.model
        self.experts = nn.ModuleDict()
        with torch.device("meta"):
            for layer in placement.moe_layers:
                self.experts[str(layer)] = Experts(len(placement.experts_on(shard, layer)), m.hidden_size,
                                                   m.moe_intermediate_size)  # fmt: skip
        self.experts.to_empty(device=self.device)
        if serving is not None:
            self.experts.to(serving.dtype)
        self._index_params()
        source = serving.checkpoint if serving is not None else cfg.train.init_from
        if source:
            load_into(dict(self.params), open_checkpoint(source), self.expert_ids)
        else:
            for name, p in self.params:
                init_parameter_(name, p, m.initializer_range, cfg.train.seed, self.expert_ids[name])
        self.graphs: dict[tuple[int, Any], tuple] = {}
        if self.train_mode:
            restrict(self.params, cfg, self.expert_ids)  # a fine-tune's frozen experts (full: none)
            self.optimizer = build_optimizer(self.params, cfg.train)  # None: no expert here trains
            self.steps_taken = 0
            self._reset_step()
        else:
            self.experts.eval()
            self.served_tokens: dict[int, int] = {}  # layer -> (row, expert) pairs computed since the start

    def _index_params(self) -> None:
        """``params`` (full-model names of the stacked tensors) and ``expert_ids`` (each one's global expert ids)."""
        self.params: list[tuple[str, nn.Parameter]] = []
        self.expert_ids: dict[str, list[int]] = {}
        for layer in self.placement.moe_layers:
            prefix = f"{moe_prefix(layer, self.cfg.model.num_hidden_layers)}.experts"
            for pname, p in self.experts[str(layer)].named_parameters():
                self.params.append((f"{prefix}.{pname}", p))
                self.expert_ids[f"{prefix}.{pname}"] = self.placement.experts_on(self.shard, layer)

    @property
    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for _, p in self.params)

    def ready(self) -> dict:
        experts = {layer: self.placement.experts_on(self.shard, layer) for layer in self.placement.moe_layers}
        params = sum(p.numel() for _, p in self.params)
        return {"pid": os.getpid(), "params": params, "param_bytes": self.param_bytes, "experts": experts,
                **this_node()}  # fmt: skip

    def _reset_step(self) -> None:
        self.ran: set[int] = set()
        self.tokens = 0  # (row, expert) pairs computed this step
        self.rows = 0
        self.compute_s = 0.0

    # -- forward and backward -------------------------------------------------------------------

    def forward(self, layer: int, key: Any, train: bool, *buffers: DispatchBuffer) -> Any:
        """Run layer ``layer``'s experts on one buffer per replica; returns one output [n, D] per buffer."""
        t0 = time.perf_counter()
        experts = self.experts[str(layer)]
        xs, ws = [], []
        for b in buffers:
            if train:  # rows arrive in the compute dtype; gradients accumulate in float32 as in one process
                xs.append(b.x.to(self.device).float().requires_grad_())
                ws.append(b.weights.to(self.device).requires_grad_())
            else:
                xs.append(b.x.to(self.device))
                ws.append(b.weights.to(self.device))
        sizes = [x.shape[0] for x in xs]
        local_ids = torch.cat([b.local_ids.to(self.device) for b in buffers])
        x, w = torch.cat(xs), torch.cat(ws)
        if not self.train_mode:  # serving: the experts are in the serving dtype already
            with torch.inference_mode():
                out = experts(x, local_ids, w, partial=True)
        else:
            with torch.set_grad_enabled(train), autocast_context(self.cfg.train.dtype, self.device):
                out = experts(x, local_ids, w, partial=True)
        if not self.train_mode:
            self.served_tokens[layer] = self.served_tokens.get(layer, 0) + int((local_ids >= 0).sum())
        if train:
            self.graphs[(layer, key)] = (xs, ws, out)
            self.ran.add(layer)
            self.tokens += int((local_ids >= 0).sum())
            self.rows += sum(sizes)
        if self.train_mode:
            self.compute_s += time.perf_counter() - t0
        return _returns([host(o) for o in out.detach().split(sizes)])

    def backward(self, layer: int, key: Any, *grads: torch.Tensor) -> Any:
        """Given each replica's gradient of its outputs, return each its :class:`ExpertGrads`."""
        t0 = time.perf_counter()
        xs, ws, out = self.graphs.pop((layer, key))
        if out.requires_grad and out.numel():
            torch.autograd.backward([out], [torch.cat([g.to(self.device) for g in grads]).to(out.dtype)])
        result = [
            ExpertGrads(host(x.grad if x.grad is not None else torch.zeros_like(x)),
                        host(w.grad if w.grad is not None else torch.zeros_like(w)))
            for x, w in zip(xs, ws)
        ]  # fmt: skip
        self.compute_s += time.perf_counter() - t0
        return _returns(result)

    # -- live re-placement (serving) ------------------------------------------------------------

    def served(self) -> dict:
        """Serving: the (row, expert) pairs this shard computed since the start, per MoE layer, and the experts
        it holds."""
        held = {layer: len(self.placement.experts_on(self.shard, layer)) for layer in self.placement.moe_layers}
        tokens = [self.served_tokens.get(layer, 0) for layer in self.placement.moe_layers]
        return {"tokens": tokens, "experts": held, "param_bytes": self.param_bytes}

    def export(self, wanted: dict[int, list[int]]) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
        """Copies of the weights of experts ``wanted`` (MoE layer -> global expert ids) this shard holds."""
        out = {}
        for layer, experts in wanted.items():
            held = self.placement.experts_on(self.shard, layer)
            module = self.experts[str(layer)]
            for e in experts:
                if e not in held:
                    raise GraphError(f"expert shard {self.shard} does not hold expert {e} of layer {layer}")
                i = held.index(e)
                out[(layer, e)] = {name: host(p.detach()[i].clone()) for name, p in module.named_parameters()}
        return out

    def adopt(self, placement: Placement, *received: dict[tuple[int, int], dict[str, torch.Tensor]]) -> dict:
        """Serving: hold the experts ``placement`` gives this shard: the ones it has, and the ``received``
        copies of the others (what :meth:`export` of their holders returned). Applied whole, or not at all."""
        if self.train_mode:
            raise GraphError(f"expert shard {self.shard}: experts move between shards only when serving")
        if placement.moe_layers != self.placement.moe_layers or placement.ep != self.placement.ep:
            raise GraphError(f"expert shard {self.shard}: a new placement may move experts only, not layers or shards")
        parts = {k: v for r in received for k, v in r.items()}
        m = self.cfg.model
        new = nn.ModuleDict()
        for layer in placement.moe_layers:
            old_ids = self.placement.experts_on(self.shard, layer)
            ids = placement.experts_on(self.shard, layer)
            old = self.experts[str(layer)]
            module = Experts(len(ids), m.hidden_size, m.moe_intermediate_size).to(old.gate_up_proj)
            with torch.no_grad():
                for name, p in module.named_parameters():
                    for i, e in enumerate(ids):
                        if e in old_ids:
                            p[i].copy_(getattr(old, name)[old_ids.index(e)])
                        elif (layer, e) in parts:
                            p[i].copy_(parts[(layer, e)][name])
                        else:
                            raise GraphError(f"expert shard {self.shard}: expert {e} of layer {layer} was not sent")
            new[str(layer)] = module.eval()
        self.experts, self.placement = new, placement
        self._index_params()
        return self.served()

    # -- the optimizer step ---------------------------------------------------------------------

    def finish(self) -> dict:
        """Squared gradient norm of the shard's experts and its work this step."""
        for layer in self.ran:  # experts that got no rows still step (zero gradient), as in one process
            for p in self.experts[str(layer)].parameters():
                if p.grad is None and p.requires_grad:
                    p.grad = torch.zeros_like(p)
        grads = [p.grad for _, p in self.params if p.grad is not None]
        sumsq = float(sum(torch.linalg.vector_norm(g.float()) ** 2 for g in grads)) if grads else 0.0
        return {"sumsq": sumsq, "tokens": self.tokens, "rows": self.rows, "compute_s": self.compute_s,
                "in_flight": len(self.graphs), "sent_bytes": self.sent_bytes(),
                "steps": self.optimizer is not None, "steps_taken": self.steps_taken}  # fmt: skip

    def apply_step(self, lr: float, clip_coef: float, biases: Any = None) -> None:
        """The optimizer step of the shard's experts; nothing when none of them trains (a fine-tune's frozen shard)."""
        t0 = time.perf_counter()
        clip_and_step([p for _, p in self.params], self.optimizer, lr, clip_coef)
        self.steps_taken += self.optimizer is not None
        self._reset_step()
        self.compute_s = time.perf_counter() - t0  # counted in the next step's report

    # -- checkpoints ----------------------------------------------------------------------------

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every expert's weights and AdamW state, one tensor per expert (global ids)."""
        stacked = {name: p.detach() for name, p in self.params}
        if self.train_mode:
            stacked.update(optimizer_state_tensors(self.params, self.optimizer))
        return split_experts(stacked, self.expert_ids)

    def save(self, directory: str) -> tuple[str, list[str]]:
        return write_part(directory, experts_file(self.shard), self.state_tensors())

    def load(self, path: str) -> None:
        """Take this shard's experts (and their AdamW state) from a training checkpoint of any layout."""
        reader = open_checkpoint(path)
        optim = {f"{OPTIMIZER_PREFIX}{n}.{k}": (torch.zeros(()) if k == "step" else torch.empty_like(p.data))
                 for n, p in self.params for k in ("exp_avg", "exp_avg_sq", "step")}  # fmt: skip
        try:
            absent = load_into({**dict(self.params), **optim}, reader, self.expert_ids,
                               optional=lambda n: n.startswith(OPTIMIZER_PREFIX))  # fmt: skip
        except ValueError as exc:
            raise GraphError(f"expert shard {self.shard} cannot load {path}: {exc}") from exc
        load_optimizer_state(self.params, self.optimizer, {k: v for k, v in optim.items() if k not in absent})


def _returns(values: list) -> Any:
    """One value per replica, as Ray's ``num_returns`` expects: a list, or the value itself for one."""
    return values[0] if len(values) == 1 else values
