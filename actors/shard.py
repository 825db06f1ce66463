"""``ExpertShard``: the routed experts a placement gives one shard, for every MoE layer, with their AdamW state.

For each (MoE layer, micro-batch) the shard receives one dispatch buffer per attention
replica, runs its experts on all of them at once (one grouped pass), and returns each replica
its rows' weighted outputs; the backward mirrors it and returns the gradients of the rows and
of the gate weights. Expert gradients accumulate over the step's micro-batches; the driver then
asks for the squared gradient norm and steps every shard. A shard takes part in every step,
also with zero rows.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from torch import nn

from raymoe.actors.placement import Placement
from raymoe.actors.stage import set_threads
from raymoe.platform.checkpoint.sharded import (
    OPTIMIZER_PREFIX,
    expert_name,
    load_optimizer_state,
    optimizer_state_tensors,
    split_experts,
    write_file,
)
from raymoe.platform.config import RaymoeConfig
from raymoe.platform.model.moe import Experts, experts_on_rows
from raymoe.platform.model.transformer import init_parameter_, moe_prefix
from raymoe.platform.train.optim import build_optimizer, clip_and_step
from raymoe.platform.train.trainer import autocast_context


class ExpertShard:
    """Expert shard ``shard`` of ``placement.ep``.

    Args:
        cfg: the run's config.
        placement: where every layer and expert lives.
        shard: this shard's index.
    """

    def __init__(self, cfg: RaymoeConfig, placement: Placement, shard: int) -> None:
        set_threads(cfg.parallel.num_cpus_per_actor, peers=placement.ep)
        self.cfg = cfg
        self.placement = placement
        self.shard = shard
        m = cfg.model
        self.experts = nn.ModuleDict()
        self.expert_ids: dict[int, list[int]] = {}
        self.names: dict[int, str] = {}  # layer -> state-dict prefix of its stacked experts
        for layer in placement.moe_layers:
            ids = placement.experts_on(shard, layer)
            self.expert_ids[layer] = ids
            self.names[layer] = f"{moe_prefix(layer, m.num_hidden_layers)}.experts"
            experts = Experts(len(ids), m.hidden_size, m.moe_intermediate_size)
            for pname, p in experts.named_parameters():
                init_parameter_(f"{self.names[layer]}.{pname}", p, m.initializer_range, cfg.train.seed, ids)
            self.experts[str(layer)] = experts
        self.params = [
            (f"{self.names[layer]}.{pname}", p)
            for layer in placement.moe_layers
            for pname, p in self.experts[str(layer)].named_parameters()
        ]
        self.optimizer = build_optimizer(self.params, cfg.train)
        self.graphs: dict[tuple[int, Any], tuple] = {}
        self._reset_step()

    def ready(self) -> dict:
        return {"pid": os.getpid(), "params": sum(p.numel() for _, p in self.params), "experts": self.expert_ids}

    def _reset_step(self) -> None:
        self.ran: set[int] = set()
        self.tokens = 0  # (row, expert) pairs computed this step
        self.rows = 0
        self.compute_s = 0.0

    # -- forward and backward -------------------------------------------------------------------

    def forward(self, layer: int, key: Any, train: bool, *buffers: tuple) -> Any:
        """Run layer ``layer``'s experts on one dispatch buffer per replica; returns one output per buffer."""
        t0 = time.perf_counter()
        experts = self.experts[str(layer)]
        xs, ws = [], []
        for x, _, w in buffers:
            # rows arrive in the compute dtype; gradients accumulate in float32 as in one process
            xs.append(x.float().requires_grad_(train))
            ws.append(w.requires_grad_(train))
        sizes = [x.shape[0] for x in xs]
        local_ids = torch.cat([ids for _, ids, _ in buffers])
        ctx = torch.enable_grad() if train else torch.no_grad()
        with ctx, autocast_context(self.cfg.train.dtype, torch.device("cpu")):
            out = experts_on_rows(experts, torch.cat(xs), local_ids, torch.cat(ws))
        if train:
            self.graphs[(layer, key)] = (xs, ws, out)
            self.ran.add(layer)
            self.tokens += int((local_ids >= 0).sum())
            self.rows += sum(sizes)
        self.compute_s += time.perf_counter() - t0
        return _returns(list(out.detach().split(sizes)))

    def backward(self, layer: int, key: Any, *grads: torch.Tensor) -> Any:
        """Given each replica's gradient of its outputs, return each its (rows, gate weights) gradients."""
        t0 = time.perf_counter()
        xs, ws, out = self.graphs.pop((layer, key))
        if out.requires_grad and out.numel():
            torch.autograd.backward([out], [torch.cat(grads).to(out.dtype)])
        result = [
            (
                x.grad if x.grad is not None else torch.zeros_like(x),
                w.grad if w.grad is not None else torch.zeros_like(w),
            )
            for x, w in zip(xs, ws)
        ]
        self.compute_s += time.perf_counter() - t0
        return _returns(result)

    # -- the optimizer step ---------------------------------------------------------------------

    def finish(self) -> dict:
        """Squared gradient norm of the shard's experts and its work this step."""
        for layer in self.ran:  # experts that got no rows still step (zero gradient), as in one process
            for p in self.experts[str(layer)].parameters():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        grads = [p.grad for _, p in self.params if p.grad is not None]
        sumsq = float(sum(torch.linalg.vector_norm(g.float()) ** 2 for g in grads)) if grads else 0.0
        return {
            "sumsq": sumsq,
            "tokens": self.tokens,
            "rows": self.rows,
            "compute_s": self.compute_s,
            "in_flight": len(self.graphs),
        }

    def apply_step(self, lr: float, clip_coef: float, biases: Any = None) -> None:
        t0 = time.perf_counter()
        clip_and_step([p for _, p in self.params], self.optimizer, lr, clip_coef)
        self._reset_step()
        self.compute_s = time.perf_counter() - t0  # counted in the next step's report

    # -- checkpoints ----------------------------------------------------------------------------

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every expert's weights and AdamW state, one tensor per expert (global ids)."""
        stacked = {name: p.detach() for name, p in self.params}
        stacked.update(optimizer_state_tensors(self.params, self.optimizer))
        ids = {f"{self.names[layer]}.{proj}": self.expert_ids[layer]
               for layer in self.placement.moe_layers for proj in ("gate_up_proj", "down_proj")}  # fmt: skip
        return split_experts(stacked, ids)

    def save(self, directory: str, filename: str) -> tuple[str, list[str]]:
        return filename, write_file(directory, filename, self.state_tensors())

    def load(self, path: str) -> None:
        """Take this shard's experts (and their AdamW state) from a checkpoint of any layout."""
        from raymoe.platform.checkpoint.training import read_training_tensors

        wanted = []
        for name, _ in self.params:
            layer = next(layer for layer in self.expert_ids if name.startswith(self.names[layer] + "."))
            for e in self.expert_ids[layer]:
                one = expert_name(name, e)
                wanted.append(one)
                wanted += [f"{OPTIMIZER_PREFIX}{one}.{k}" for k in ("exp_avg", "exp_avg_sq", "step")]
        tensors = read_training_tensors(path, wanted, self.cfg.model, optional=lambda n: n.startswith(OPTIMIZER_PREFIX))
        optim = {}
        with torch.no_grad():
            for name, p in self.params:
                layer = next(layer for layer in self.expert_ids if name.startswith(self.names[layer] + "."))
                ids = self.expert_ids[layer]
                p.copy_(torch.stack([tensors[expert_name(name, e)] for e in ids]))
                for kind in ("exp_avg", "exp_avg_sq"):
                    keys = [f"{OPTIMIZER_PREFIX}{expert_name(name, e)}.{kind}" for e in ids]
                    if all(k in tensors for k in keys):
                        optim[f"{OPTIMIZER_PREFIX}{name}.{kind}"] = torch.stack([tensors[k] for k in keys])
                step_key = f"{OPTIMIZER_PREFIX}{expert_name(name, ids[0])}.step" if ids else None
                if step_key in tensors and f"{OPTIMIZER_PREFIX}{name}.exp_avg" in optim:
                    optim[f"{OPTIMIZER_PREFIX}{name}.step"] = tensors[step_key]
        load_optimizer_state(self.params, self.optimizer, optim)


def _returns(values: list) -> Any:
    """One value per replica, as Ray's ``num_returns`` expects: a list, or the value itself for one."""
    return values[0] if len(values) == 1 else values
