"""The training driver of the actor graph: builds the actors and submits every training step's schedule.

One step, for the dp × (micro-batches per replica) micro-batches of a global batch:

1. forward, stage by stage: each stage replica starts the micro-batch, and for each of its MoE
   layers hands one dispatch buffer per expert shard; each shard runs its experts on the
   buffers of every replica at once and returns each replica its outputs; the stage combines
   them and goes on. The next stage starts from the last one's hidden rows.
2. backward, in reverse: the last stage starts from its losses; shards get the gradients of
   their outputs and return those of the dispatched rows and gate weights.
3. every actor reports its squared gradient norm (replicated stages after their all-reduce),
   its expert loads and loss statistics; the driver clips by the global norm, computes the
   learning rate and the new biases from the loads of the whole step, and every actor steps.

The driver submits the whole schedule of steps 1 and 2 at once, passing object references between
actors: activations and gradients go actor to actor and the driver never fetches them. It waits
only for the small reports of step 3, each wait bounded (:mod:`raymoe.actors.runtime`).

With dp = pp = ep = 1 the graph is one colocated :class:`~raymoe.actors.stage.Stage` that holds the
whole model with its experts and answers its own expert calls: no dispatch, no transfers.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

import torch

from raymoe.actors.messages import BackwardRefs, StageRefs, TrainInput
from raymoe.actors.placement import Placement, placement_for
from raymoe.actors.runtime import GraphError, actor_bundle, make_runtime
from raymoe.actors.shard import Shard
from raymoe.actors.stage import Stage
from raymoe.platform.analysis.capture import RoutingRecord, merge_parts
from raymoe.platform.checkpoint.reader import open_checkpoint
from raymoe.platform.checkpoint.sharded import save_checkpoint, set_rng_state
from raymoe.platform.config import RaymoeConfig, config_to_dict, model_config_to_hf
from raymoe.platform.train.balance import bias_delta, gamma_at, max_violation
from raymoe.platform.train.optim import clip_coefficient, cosine_lr
from raymoe.platform.train.trainer import StepMetrics, check_same_model

logger = logging.getLogger(__name__)


def actor_options(cfg: RaymoeConfig, many: bool) -> dict[str, Any]:
    """Ray options of every actor of a graph: its resources, no restarts, and passive OpenMP when actors share cores."""
    p = cfg.parallel
    options: dict[str, Any] = {"num_cpus": p.num_cpus_per_actor, "num_gpus": p.num_gpus_per_actor, "max_restarts": 0}
    if many and "OMP_WAIT_POLICY" not in os.environ:
        # actors take turns on shared cores: idle OpenMP threads sleep instead of spinning (measured on the
        # bench preset, 2 cores: (1,1,2) 1.32x -> 1.04x the local step; (1,2,2) 1.36x -> 1.05x)
        options["runtime_env"] = {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}}
    return options


class GraphTrainer:
    """Pretraining on the actor graph: the trainer interface of :class:`~raymoe.platform.train.trainer.LocalTrainer`.

    Args:
        cfg: the run's config; ``cfg.parallel`` gives dp, pp, ep, micro-batches per replica,
            resources per actor and the wait timeouts.
        placement: where layers and experts live (default: ``parallel.expert_placement``'s, see
            :func:`~raymoe.actors.placement.placement_for`).
        in_process: run the actors as plain objects in this process (no Ray).
    """

    kind = "graph"

    def __init__(self, cfg: RaymoeConfig, placement: Placement | None = None, in_process: bool = False) -> None:
        self.cfg = cfg
        p = cfg.parallel
        self.placement = placement or placement_for(cfg)
        self.dp, self.pp, self.ep = p.dp, self.placement.pp, self.placement.ep
        self.colocated = self.dp == self.pp == self.ep == 1 and placement is None
        self.step = 0
        # train.compile: the first step compiles every stage's regions (tens of seconds with inductor's cache
        # cold), so it waits up to parallel.long_timeout_s; the steps after it, parallel.timeout_s
        self._compiling = cfg.train.compile
        self.rt = make_runtime(in_process, p.timeout_s, p.long_timeout_s, where="step 0", transport=p.transport)
        self.biases = torch.zeros(len(self.placement.moe_layers), cfg.model.n_routed_experts)
        options = actor_options(cfg, many=not self.colocated)
        t0 = time.perf_counter()
        try:
            n_actors = 1 if self.colocated else self.dp * self.pp + self.ep
            bundle = actor_bundle(p.num_cpus_per_actor, p.num_gpus_per_actor, p.memory_per_actor_gb)
            self.rt.reserve([bundle] * n_actors, p.placement, p.reserve_timeout_s)
            self.stages = [
                [
                    self.rt.make(
                        Stage, _stage_label(r, s, self.colocated), options, cfg, self.placement, r, s, self.colocated
                    )
                    for s in range(self.pp)
                ]  # fmt: skip
                for r in range(self.dp)
            ]
            self.shards = [] if self.colocated else [
                self.rt.make(Shard, f"Shard({k})", options, cfg, self.placement, k) for k in range(self.ep)
            ]  # fmt: skip
            info = self.rt.get([self.rt.call(a, "ready")[0] for a in self.actors()], "starting the actors", long=True)
            if not self.colocated:
                self.rt.connect()
        except BaseException:
            self.shutdown()  # actors that did start (or wait for resources) must not linger
            raise
        self.pids = {label: i["pid"] for label, i in zip(self.rt.labels, info)}
        self.rt.record(info)
        self.param_bytes = {label: i["param_bytes"] for label, i in zip(self.rt.labels, info)}
        if self.dp > 1 and not self.rt.in_process:
            self._init_collectives()
        self.eff_ep = 0 if self.colocated else self.ep
        self.moe_by_stage = [
            [layer for layer in self.placement.moe_layers if self.placement.stage_of(layer) == s]
            for s in range(self.pp)
        ]
        self.mtp_split = self.pp > 1 and cfg.model.num_nextn_predict_layers > 0  # MTP far from the embedding
        self.mtp_across_stages = self.mtp_split and cfg.train.mtp_lambda > 0
        self.timings: dict[str, float] = {}
        try:
            self.biases = self._gather_biases()
        except BaseException:
            self.shutdown()
            raise
        logger.info("actor graph dp=%d pp=%d ep=%d (%d actors) ready in %.1f s; parameter bytes per actor %s",
                    self.dp, self.pp, self.ep, len(self.actors()), time.perf_counter() - t0,
                    self.param_bytes)  # fmt: skip

    # -- actors ---------------------------------------------------------------------------------

    def actors(self) -> list:
        return [a for row in self.stages for a in row] + list(self.shards)

    def actor_keys(self) -> list[str]:
        """Short names of the actors for metrics: ``stage_r0_s1``, ``shard_2`` (``colocated``)."""
        if self.colocated:
            return ["colocated"]
        return [f"stage_r{r}_s{s}" for r in range(self.dp) for s in range(self.pp)] + [
            f"shard_{k}" for k in range(self.ep)
        ]

    def describe(self) -> dict[str, Any]:
        """The parallel layout and each actor's parameter bytes, for tracking."""
        experts = [len(self.placement.experts_on(k, self.placement.moe_layers[0])) for k in range(self.ep)]
        out = {
            "trainer": self.kind, "graph.dp": self.dp, "graph.pp": self.pp, "graph.ep": self.ep,
            "graph.actors": len(self.actors()), "graph.colocated": self.colocated,
            "graph.stage_layers": str([list(b) for b in self.placement.stage_bounds]),
            "graph.experts_per_shard": str(experts if self.placement.moe_layers else []),
            "graph.expert_placement": self.cfg.parallel.expert_placement,
        }  # fmt: skip
        out |= {f"graph.param_bytes.{key}": n for key, n in zip(self.actor_keys(), self.param_bytes.values())}
        return out

    def _init_collectives(self) -> None:
        if getattr(self.rt, "collective", None) is not None:  # the direct transport made the world: subgroups of it
            rank = {id(a): i for i, a in enumerate(self.rt.actors)}
            for s in range(self.pp):
                group = [self.stages[r][s] for r in range(self.dp)]
                ranks = [rank[id(a)] for a in group]
                calls = [self.rt.call(a, "join", ranks)[0] for a in group]
                self.rt.get(calls, f"the gradient all-reduce group of stage {s}", long=True)
            return
        for s in range(self.pp):
            group = [self.stages[r][s] for r in range(self.dp)]
            addr, port = self.rt.get(self.rt.call(group[0], "node_address"), "collective setup", long=True)[0]
            calls = [self.rt.call(a, "setup", addr, port, self.dp, r, self.cfg.parallel.timeout_s)[0]
                     for r, a in enumerate(group)]  # fmt: skip
            self.rt.get(calls, f"the gradient all-reduce group of stage {s}", long=True)

    def _get(self, refs: list, what: str, long: bool = False) -> list:
        self.rt.where = f"step {self.step}"
        return self.rt.get(refs, what, long)

    def shutdown(self) -> None:
        """Kill every actor and wait (briefly) until Ray reports them gone (idempotent)."""
        self.rt.close()
        self.stages, self.shards = [], []

    close = shutdown

    # -- one training step ----------------------------------------------------------------------

    def train_step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> StepMetrics:
        """One optimizer step over ``micro_batches``: dp × micro-batches per replica, a contiguous block per replica."""
        t0 = time.perf_counter()
        tc = self.cfg.train
        n = len(micro_batches)
        if n % self.dp:
            raise ValueError(f"{n} micro-batches cannot be split over parallel.dp={self.dp} replicas")
        M = n // self.dp
        batches = [[self.rt.put(TrainInput(*micro_batches[r * M + m], scale=1.0 / n)) for m in range(M)]
                   for r in range(self.dp)]  # fmt: skip
        groups = [[(r, m) for r in range(self.dp)] for m in range(M)]
        self._forward(groups, batches, train=True)
        self._backward(groups)
        if self.dp > 1 and self.rt.in_process:
            _sum_replica_grads(self.stages)
        t_submit = time.perf_counter()
        reports = self._get([self.rt.call(a, "finish")[0] for a in self.actors()], "the step's forward and backward",
                            long=self._compiling)  # fmt: skip
        self._compiling = False
        t_wait = time.perf_counter()
        stage_reports = reports[: self.dp * self.pp]
        shard_reports = reports[self.dp * self.pp :]
        grad_norm = math.sqrt(sum(r["sumsq"] for r in reports))
        clip = clip_coefficient(grad_norm, tc.grad_clip)
        lr = cosine_lr(self.step, tc.steps, tc.lr, tc.warmup_steps, tc.min_lr_ratio)
        loads = self._loads(stage_reports)
        gamma = gamma_at(self.step, tc.steps, tc.bias_update_speed, tc.bias_update_speed_final)
        if gamma != 0 and loads.numel():
            self.biases = self.biases + bias_delta(loads, gamma)
        calls = [self.rt.call(a, "apply_step", lr, clip, self._biases_for(s))[0]
                 for a, s in zip(self.actors(), self._actor_stages())]  # fmt: skip
        self._get(calls, "the optimizer step")
        stats = [s for rep in stage_reports for s in rep["stats"]]
        main = sum(s["main"] for s in stats) / n
        mtp_vals = [s["mtp"] for s in stats if s["mtp"] is not None]
        mtp = sum(mtp_vals) / n if mtp_vals else None
        aux = sum(rep["aux"] for rep in stage_reports) / n if tc.seq_aux_alpha > 0 else None
        loss = main + (tc.mtp_lambda * mtp if mtp is not None else 0.0) + (aux or 0.0)
        seconds = time.perf_counter() - t0
        self.timings = {"graph/step_s": seconds, "graph/submit_s": t_submit - t0, "graph/wait_s": t_wait - t_submit,
                        "graph/update_s": time.perf_counter() - t_wait}  # fmt: skip
        for key, rep in zip(self.actor_keys(), reports):
            # an actor's wait: the part of the step it spent not computing (waiting on others, transfers)
            self.timings[f"compute_s/{key}"] = rep["compute_s"]
            self.timings[f"wait_s/{key}"] = max(seconds - rep["compute_s"], 0.0)
        for k, rep in enumerate(shard_reports):
            self.timings[f"tokens/shard_{k}"] = rep["tokens"]
        if shard_reports:  # a fine-tune steps only the shards that hold trained experts
            self.timings["graph/shards_stepping"] = sum(bool(rep.get("steps", True)) for rep in shard_reports)
        # tensors the actors handed each other this step (activations, dispatch buffers, gradients)
        self.timings["graph/moved_mb"] = sum(rep.get("sent_bytes", 0) for rep in reports) / 2**20
        metrics = StepMetrics(
            step=self.step, loss=loss, main_loss=main, mtp_loss=mtp, aux_loss=aux, lr=lr, grad_norm=grad_norm,
            tokens=sum(s["tokens"] for s in stats), seconds=seconds, loads=loads,
            max_vio=max_violation(loads) if loads.numel() else torch.zeros(0),
            bias_min=float(self.biases.min()) if self.biases.numel() else 0.0,
            bias_max=float(self.biases.max()) if self.biases.numel() else 0.0, extra=dict(self.timings),
            biases=self.biases.clone(),
        )  # fmt: skip
        self.step += 1
        return metrics

    def _loads(self, stage_reports: list[dict]) -> torch.Tensor:
        """The step's loads [n_moe_layers, E], summed over replicas and micro-batches."""
        loads = torch.zeros_like(self.biases)
        for rep in stage_reports:
            for layer, counts in zip(rep["layers"], rep["loads"]):
                loads[self.placement.moe_layers.index(layer)] += counts
        return loads

    def _actor_stages(self) -> list[int | None]:
        return [s for _ in range(self.dp) for s in range(self.pp)] + [None] * len(self.shards)

    def _biases_for(self, stage: int | None) -> dict[int, torch.Tensor]:
        if stage is None:
            return {}
        layers = self.moe_by_stage[stage]
        return {layer: self.biases[self.placement.moe_layers.index(layer)].clone() for layer in layers}

    def _moe_run(self, stage: int, train: bool, record: bool = False) -> list[int]:
        """The MoE layers stage ``stage`` dispatches: the MTP modules' only when training with mtp_lambda > 0,
        or when recording the routing."""
        if self.colocated:
            return []  # the colocated stage answers its own experts
        mtp = record or (train and self.cfg.train.mtp_lambda > 0)
        return [layer for layer in self.moe_by_stage[stage] if mtp or layer < self.cfg.model.num_hidden_layers]

    def _forward(self, groups: list[list[tuple[int, Any]]], batches: Any, train: bool, record: bool = False) -> None:
        """Submit the forward of every micro-batch: stage by stage, MoE layer by MoE layer, micro-batch by micro-batch.

        ``groups`` lists the micro-batches whose dispatch buffers a shard takes in one call:
        (replica, key) pairs, one per replica in training."""
        rt, ep = self.rt, self.eff_ep
        carry: dict = {}
        emb: dict = {}
        for s in range(self.pp):
            outs: dict[tuple, StageRefs] = {}
            for group in groups:
                for r, key in group:
                    st = self.stages[r][s]
                    batch = batches[r][key] if train else batches[key]
                    if s == 0 and (self.mtp_across_stages if train else record and self.mtp_split):
                        emb[(r, key)] = rt.call(st, "mtp_embed", key, batch, direct=True)[0]
                    mtp = emb.get((r, key)) if s == self.pp - 1 else None
                    outs[(r, key)] = StageRefs.of(
                        rt.call(st, "begin", key, batch, carry.get((r, key)), mtp, n=ep + 1, direct=True)
                    )
            for layer in self._moe_run(s, train, record):
                for group in groups:
                    shard_key = group[0][1]
                    shard_outs = [
                        rt.call(
                            self.shards[k],
                            "forward",
                            layer,
                            shard_key,
                            train,
                            *[outs[(r, key)].buffers[k] for r, key in group],
                            n=len(group),
                            direct=True,
                        )  # fmt: skip
                        for k in range(ep)
                    ]
                    for i, (r, key) in enumerate(group):
                        refs = rt.call(
                            self.stages[r][s], "resume", key, *[so[i] for so in shard_outs], n=ep + 1, direct=True
                        )
                        outs[(r, key)] = StageRefs.of(refs)
            carry = {rk: o.output for rk, o in outs.items()}

    def _backward(self, groups: list[list[tuple[int, Any]]]) -> None:
        rt, ep = self.rt, self.eff_ep
        grad: dict = {}
        mtp_grad: dict = {}
        for s in reversed(range(self.pp)):
            outs: dict[tuple, BackwardRefs] = {}
            for group in groups:
                for r, key in group:
                    refs = rt.call(self.stages[r][s], "backward_begin", key, grad.get((r, key)), n=ep + 2, direct=True)
                    outs[(r, key)] = BackwardRefs.of(refs)
            for layer in reversed(self._moe_run(s, True)):
                for group in groups:
                    shard_key = group[0][1]
                    shard_grads = [
                        rt.call(
                            self.shards[k],
                            "backward",
                            layer,
                            shard_key,
                            *[outs[(r, key)].grads[k] for r, key in group],
                            n=len(group),
                            direct=True,
                        )  # fmt: skip
                        for k in range(ep)
                    ]
                    for i, (r, key) in enumerate(group):
                        refs = rt.call(self.stages[r][s], "backward_resume", key, *[sg[i] for sg in shard_grads],
                                       n=ep + 2, direct=True)  # fmt: skip
                        outs[(r, key)] = BackwardRefs.of(refs)
            grad = {rk: o.grad_hidden for rk, o in outs.items()}
            if s == self.pp - 1 and self.mtp_across_stages:
                mtp_grad = {rk: o.grad_mtp for rk, o in outs.items()}
            if s == 0 and self.mtp_across_stages:
                for (r, key), g in mtp_grad.items():
                    rt.call(self.stages[r][0], "mtp_embed_backward", key, g)

    # -- evaluation -----------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, torch.Tensor]:
        """Mean main loss and MaxVio_global per main MoE layer over ``batches`` (forward only, spread over replicas)."""
        refs = {f"eval{i}": self.rt.put(TrainInput(*b, train=False)) for i, b in enumerate(batches)}
        groups = [[(i % self.dp, f"eval{i}")] for i in range(len(batches))]
        self._forward(groups, refs, train=False)
        calls = [self.rt.call(self.stages[r][s], "eval_result")[0] for r in range(self.dp) for s in range(self.pp)]
        reports = self._get(calls, "evaluation", long=True)
        loss_sum = sum(rep["loss_sum"] for rep in reports)
        tokens = sum(rep["tokens"] for rep in reports)
        loads = self._loads(reports)[: self.cfg.model.num_moe_layers]
        return loss_sum / max(tokens, 1), max_violation(loads) if loads.numel() else torch.zeros(0)

    @torch.no_grad()
    def record(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[RoutingRecord]:
        """The routing of every MoE layer (MTP modules included) over each of ``batches``, one record each.

        Every stage records the layers it holds while it routes them; the records come back with the
        evaluation's results and are joined here (:func:`~raymoe.platform.analysis.capture.merge_parts`)."""
        refs = {f"record{i}": self.rt.put(TrainInput(*b, train=False, record=True)) for i, b in enumerate(batches)}
        groups = [[(i % self.dp, f"record{i}")] for i in range(len(batches))]
        self._forward(groups, refs, train=False, record=True)
        calls = [self.rt.call(self.stages[r][s], "eval_result")[0] for r in range(self.dp) for s in range(self.pp)]
        reports = self._get(calls, "recording the routing", long=True)
        n_layers = self.cfg.model.num_hidden_layers
        return [merge_parts(*b, n_layers, [rep["records"][f"record{i}"] for rep in reports
                                           if f"record{i}" in rep["records"]])
                for i, b in enumerate(batches)]  # fmt: skip

    def set_biases(self, biases: dict[int, torch.Tensor]) -> None:
        """Give the gates of the layers named new biases (every replica), as the optimizer step would."""
        for layer, b in biases.items():
            self.biases[self.placement.moe_layers.index(layer)] = b.to(self.biases)
        calls = [self.rt.call(self.stages[r][s], "set_biases", {layer: b for layer, b in biases.items()
                                                                if layer in self.moe_by_stage[s]})[0]
                 for r in range(self.dp) for s in range(self.pp)]  # fmt: skip
        self._get(calls, "setting the biases")

    # -- checkpoints ----------------------------------------------------------------------------

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's state dict (experts stacked), gathered from the actors: for tests and export."""
        from raymoe.platform.checkpoint.layout import OPTIMIZER_PREFIX, stack_experts

        owners = [self.stages[0][s] for s in range(self.pp)] + list(self.shards)
        parts = self._get([self.rt.call(a, "state_tensors")[0] for a in owners], "reading the model", long=True)
        merged = {k: v for part in parts for k, v in part.items() if not k.startswith(OPTIMIZER_PREFIX)}
        return stack_experts(merged, self.cfg.model.n_routed_experts)

    def save_checkpoint(self, root: str, state: dict[str, Any], extra_files: list | None = None) -> str:
        """Every actor writes its tensors, the driver the rest; visible only when complete. Returns its location."""

        def write_parts(directory: str) -> list:
            calls = [self.rt.call(self.stages[0][s], "save", directory)[0] for s in range(self.pp)]
            calls += [self.rt.call(a, "save", directory)[0] for a in self.shards]
            try:
                return self._get(calls, "writing a checkpoint", long=True)
            except GraphError:
                self.rt.settle(calls)  # let the live actors finish writing before the folder is removed
                raise

        layout = {"dp": self.dp, "pp": self.pp, "ep": self.ep}
        full = {"trainer": self.kind, "parallel": layout, "placement": self.placement.to_dict(),
                "biases": self.biases.tolist(), "config": config_to_dict(self.cfg), **state}  # fmt: skip
        return save_checkpoint(root, self.step, write_parts, full, model_config_to_hf(self.cfg.model),
                               extra_files or [], self.cfg.train.keep_last)  # fmt: skip

    def _gather_biases(self) -> torch.Tensor:
        """The gates' biases as the stages hold them (initialized, or from ``train.init_from``)."""
        calls = [self.rt.call(self.stages[0][s], "biases")[0] for s in range(self.pp)]
        by_layer = {layer: b for part in self._get(calls, "reading the biases", long=True) for layer, b in part.items()}
        if not self.placement.moe_layers:
            return self.biases
        return torch.stack([by_layer[layer] for layer in self.placement.moe_layers])

    def load_checkpoint(self, path: str) -> dict[str, Any]:
        """Restore every actor from a training checkpoint of any layout (re-sharding as needed); returns its state."""
        reader = open_checkpoint(str(path))
        if reader.state is None:
            raise GraphError(f"{path} is not a training checkpoint: it has no trainer state to resume")
        check_same_model(self.cfg, reader.model_config, str(path))
        self._get([self.rt.call(a, "load", reader.location)[0] for a in self.actors()], f"loading {path}", long=True)
        state = reader.state
        self.step = int(state["step"])
        self.biases = torch.tensor(state["biases"], dtype=torch.float32).reshape(self.biases.shape)
        if "rng" in state:
            set_rng_state(state["rng"])
        return state


def _stage_label(replica: int, stage: int, colocated: bool) -> str:
    return "Stage(whole model)" if colocated else f"Stage(replica {replica}, stage {stage})"


def _sum_replica_grads(stages: list[list[Stage]]) -> None:
    """In-process stand-in for the replicas' all-reduce: every replica gets the sum, added in replica order."""
    for s in range(len(stages[0])):
        replicas = [row[s] for row in stages]
        for params in zip(*[[p for _, p in rep.params] for rep in replicas]):
            grads = [p.grad for p in params if p.grad is not None]
            if grads:
                total = torch.stack(grads).sum(0)
                for p in params:
                    p.grad = total.clone()
