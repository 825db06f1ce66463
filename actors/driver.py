"""The driver of the actor graph: builds the actors and runs every training step's schedule.

One step, for the dp × (micro-batches per replica) micro-batches of a global batch:

1. forward, stage by stage: each stage replica starts the micro-batch, and for each of its MoE
   layers hands one dispatch buffer per expert shard; each shard runs its experts on the
   buffers of every replica at once and returns each replica its outputs; the stage combines
   them and goes on. The next stage starts from the last one's hidden states.
2. backward, in reverse: the last stage starts from its losses; shards get the gradients of
   their outputs and return those of the dispatched rows and gate weights.
3. every actor reports its squared gradient norm (replicated stages after their all-reduce),
   its expert loads and loss statistics; the driver clips by the global norm, computes the
   learning rate and the new biases from the loads of the whole step, and every actor steps.

The driver submits the calls and passes object references between actors: activations and
gradients go actor to actor through Ray's object store and the driver never fetches them. It
waits only for the small reports of step 3, each wait bounded by ``parallel.timeout_s``.

With dp = pp = ep = 1 the graph is one actor that holds the whole model and runs the
single-process trainer inside it (:class:`ColocatedStage`): no dispatch, no transfers.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from dataclasses import dataclass
from typing import Any

import torch

from raymoe.actors.placement import Placement, build_placement
from raymoe.actors.shard import ExpertShard
from raymoe.actors.stage import AttentionStage, GraphError
from raymoe.platform.checkpoint.sharded import (
    OPTIMIZER_PREFIX,
    abort_checkpoint,
    begin_checkpoint,
    commit_checkpoint,
    filesystem,
    join,
    load_optimizer_state,
    optimizer_state_tensors,
    split_experts,
    write_file,
)
from raymoe.platform.config import RaymoeConfig
from raymoe.platform.train.balance import bias_delta, gamma_at, max_violation
from raymoe.platform.train.checkpointing import rng_state, set_rng_state
from raymoe.platform.train.optim import cosine_lr
from raymoe.platform.train.trainer import LocalTrainer, StepMetrics

logger = logging.getLogger(__name__)


class ColocatedStage:
    """The whole graph in one actor (dp = pp = ep = 1): the single-process trainer, checkpointed like the graph."""

    def __init__(self, cfg: RaymoeConfig) -> None:
        from raymoe.actors.stage import set_threads

        set_threads(cfg.parallel.num_cpus_per_actor)
        torch.manual_seed(cfg.train.seed)
        self.cfg = cfg
        self.trainer = LocalTrainer(cfg)
        self.compute_s = 0.0

    def ready(self) -> dict:
        return {"pid": os.getpid(), "params": sum(p.numel() for p in self.trainer.model.parameters())}

    def train_step(self, micro_batches: list) -> StepMetrics:
        return self.trainer.train_step(micro_batches)

    def evaluate(self, batches: list) -> tuple[float, torch.Tensor]:
        return self.trainer.evaluate(batches)

    def model_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.trainer.model.state_dict().items()}

    def set_step(self, step: int) -> None:
        self.trainer.step = step

    def biases(self) -> torch.Tensor:
        return torch.stack([m.gate.e_score_correction_bias.float() for m in self.trainer.moe_layers])

    def save(self, directory: str, filename: str) -> tuple[str, list[str]]:
        model = self.trainer.model
        tensors = dict(model.state_dict())
        tensors.update(optimizer_state_tensors(list(model.named_parameters()), self.trainer.optimizer))
        return filename, write_file(directory, filename, split_experts(tensors))

    def load(self, path: str) -> None:
        from raymoe.platform.checkpoint.sharded import stack_experts
        from raymoe.platform.checkpoint.training import read_training_tensors

        model = self.trainer.model
        params = list(model.named_parameters())
        full = dict(model.state_dict())
        wanted = list(split_experts(full))
        opt_names = split_experts(
            {f"{OPTIMIZER_PREFIX}{n}.{k}": (p if k != "step" else torch.zeros(())) for n, p in params
             for k in ("exp_avg", "exp_avg_sq", "step")}
        )  # fmt: skip
        tensors = read_training_tensors(
            path, wanted + list(opt_names), self.cfg.model, optional=lambda n: n.startswith(OPTIMIZER_PREFIX)
        )
        stacked = stack_experts(tensors, self.cfg.model.n_routed_experts)
        model.load_state_dict({k: v for k, v in stacked.items() if not k.startswith(OPTIMIZER_PREFIX)}, strict=True)
        load_optimizer_state(params, self.trainer.optimizer, stacked)


@dataclass
class _Ray:
    """Calls on Ray actors: asynchronous, results are object references."""

    timeout_s: float

    def make(self, cls: type, options: dict, *args: Any) -> Any:
        import ray

        return ray.remote(cls).options(**options).remote(*args)

    def call(self, actor: Any, method: str, *args: Any, n: int = 1) -> list:
        refs = getattr(actor, method).options(num_returns=n).remote(*args)
        return [refs] if n == 1 else list(refs)

    def put(self, value: Any) -> Any:
        import ray

        return ray.put(value)


@dataclass
class _InProcess:
    """The same schedule on plain objects in this process (tests of the math; debugging)."""

    timeout_s: float

    def make(self, cls: type, options: dict, *args: Any) -> Any:
        return cls(*args)

    def call(self, actor: Any, method: str, *args: Any, n: int = 1) -> list:
        out = getattr(actor, method)(*args)
        return [out] if n == 1 else list(out)  # as Ray's num_returns splits them

    def put(self, value: Any) -> Any:
        return value


class GraphTrainer:
    """Pretraining on the actor graph: ``train_step`` has the contract of :class:`LocalTrainer`'s.

    Args:
        cfg: the run's config; ``cfg.parallel`` gives dp, pp, ep, micro-batches per replica,
            resources per actor and the wait timeout.
        placement: where layers and experts live (default: even contiguous splits).
        in_process: run the actors as plain objects in this process (no Ray).
    """

    def __init__(self, cfg: RaymoeConfig, placement: Placement | None = None, in_process: bool = False) -> None:
        self.cfg = cfg
        p = cfg.parallel
        self.placement = placement or build_placement(cfg.model, p)
        self.dp, self.pp, self.ep = p.dp, self.placement.pp, self.placement.ep
        self.colocated = self.dp == self.pp == self.ep == 1 and placement is None
        self.rt = _InProcess(p.timeout_s) if in_process else _Ray(p.timeout_s)
        if not in_process:
            ensure_ray()
        self.step = 0
        n_moe, E = len(self.placement.moe_layers), cfg.model.n_routed_experts
        self.biases = torch.zeros(n_moe, E)
        self.labels: dict[str, str] = {}  # actor id -> "AttentionStage(replica 0, stage 1)"
        options: dict[str, Any] = {"num_cpus": p.num_cpus_per_actor, "num_gpus": p.num_gpus_per_actor}
        options["max_restarts"] = 0
        if not (self.dp == self.pp == self.ep == 1) and "OMP_WAIT_POLICY" not in os.environ:
            # actors take turns on shared cores: idle OpenMP threads sleep instead of spinning (measured on the
            # bench preset, 2 cores: (1,1,2) 1.32x -> 1.04x the local step; (1,2,2) 1.36x -> 1.05x)
            options["runtime_env"] = {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}}
        t0 = time.perf_counter()
        if self.colocated:
            self.local = self.rt.make(ColocatedStage, options, cfg)
            self.stages, self.shards = [[self.local]], []
            self._label(self.local, "ColocatedStage(whole model)")
        else:
            self.local = None
            self.stages = [
                [self.rt.make(AttentionStage, options, cfg, self.placement, r, s) for s in range(self.pp)]
                for r in range(self.dp)
            ]
            self.shards = [self.rt.make(ExpertShard, options, cfg, self.placement, k) for k in range(self.ep)]
            for r, row in enumerate(self.stages):
                for s, a in enumerate(row):
                    self._label(a, f"AttentionStage(replica {r}, stage {s})")
            for k, a in enumerate(self.shards):
                self._label(a, f"ExpertShard({k})")
        try:
            ready = [self.rt.call(a, "ready")[0] for a in self.actors()]
            info = self._get(ready, long=True, what="starting the actors")
        except BaseException:
            self.shutdown()  # actors that did start (or wait for resources) must not linger
            raise
        self.pids = {label: i["pid"] for label, i in zip(self.actor_labels(), info)}
        if self.dp > 1 and not in_process:
            self._init_collectives()
        self.moe_by_stage = [
            [layer for layer in self.placement.moe_layers if self.placement.stage_of(layer) == s]
            for s in range(self.pp)
        ]
        self.mtp_across_stages = self.pp > 1 and cfg.model.num_nextn_predict_layers > 0 and cfg.train.mtp_lambda > 0
        self.timings: dict[str, float] = {}
        logger.info(
            "actor graph dp=%d pp=%d ep=%d (%d actors) ready in %.1f s",
            self.dp, self.pp, self.ep, len(self.actors()), time.perf_counter() - t0,
        )  # fmt: skip

    # -- actors ---------------------------------------------------------------------------------

    def actors(self) -> list:
        return [a for row in self.stages for a in row] + list(self.shards)

    def actor_labels(self) -> list[str]:
        if self.colocated:
            return ["ColocatedStage(whole model)"]
        return [f"AttentionStage(replica {r}, stage {s})" for r in range(self.dp) for s in range(self.pp)] + [
            f"ExpertShard({k})" for k in range(self.ep)
        ]

    def actor_keys(self) -> list[str]:
        """Short names of the actors for metrics: ``stage_r0_s1``, ``shard_2``."""
        if self.colocated:
            return ["colocated"]
        return [f"stage_r{r}_s{s}" for r in range(self.dp) for s in range(self.pp)] + [
            f"shard_{k}" for k in range(self.ep)
        ]

    def _label(self, actor: Any, label: str) -> None:
        actor_id = getattr(actor, "_actor_id", None)
        if actor_id is not None:
            self.labels[actor_id.hex()] = label

    def describe(self) -> dict[str, Any]:
        """The parallel layout, for tracking."""
        return {
            "graph.dp": self.dp,
            "graph.pp": self.pp,
            "graph.ep": self.ep,
            "graph.actors": len(self.actors()),
            "graph.colocated": self.colocated,
            "graph.stage_layers": str([list(b) for b in self.placement.stage_bounds]),
            "graph.experts_per_shard": str([len(self.placement.experts_on(k, self.placement.moe_layers[0]))
                                            for k in range(self.ep)] if self.placement.moe_layers else []),
        }  # fmt: skip

    def _init_collectives(self) -> None:
        for s in range(self.pp):
            group = [self.stages[r][s] for r in range(self.dp)]
            addr, port = self._get(self.rt.call(group[0], "node_address"), long=True, what="collective setup")[0]
            self._get(
                [
                    self.rt.call(a, "setup", addr, port, self.dp, r, self.cfg.parallel.timeout_s)[0]
                    for r, a in enumerate(group)
                ],
                long=True,
                what=f"the gradient all-reduce group of stage {s}",
            )

    def _get(self, refs: list, what: str, long: bool = False) -> list:
        """Wait for ``refs`` at most ``parallel.timeout_s`` (``long_timeout_s`` when ``long``); a dead or
        failing actor is a GraphError naming it."""
        if isinstance(self.rt, _InProcess):
            return refs
        import ray

        timeout = self.cfg.parallel.long_timeout_s if long else self.rt.timeout_s
        try:
            return ray.get(refs, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            name = "long_timeout_s" if long else "timeout_s"
            raise GraphError(f"step {self.step}: {what} took longer than parallel.{name}={timeout:g} s") from None
        except ray.exceptions.RayActorError as exc:
            raise GraphError(f"step {self.step}: {self._who(exc)} died while {what}: {_first_line(exc)}") from exc
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            if isinstance(cause, ray.exceptions.RayActorError):
                raise GraphError(f"step {self.step}: {self._who(cause)} died while {what}") from exc
            raise GraphError(
                f"step {self.step}: {self._who(exc)} failed while {what}: {type(cause).__name__}: {cause}"
            ) from exc

    def _who(self, exc: BaseException) -> str:
        text = str(exc)
        for actor_id, label in self.labels.items():
            if actor_id in text:
                return label
        m = re.search(r"class_name: (\w+)", text)
        return f"an actor ({m.group(1)})" if m else "an actor"

    def shutdown(self) -> None:
        """Kill every actor and wait (briefly) until Ray reports them gone (idempotent)."""
        if isinstance(self.rt, _Ray):
            import ray

            actors = self.actors()
            for a in actors:
                try:
                    ray.kill(a)
                except Exception:  # noqa: BLE001 - already dead
                    pass
            for a in actors:  # a call on a killed actor fails once Ray has processed the kill
                try:
                    ray.get(a.ready.remote(), timeout=5)
                except Exception:  # noqa: BLE001 - expected: the actor is dead
                    pass
        self.stages, self.shards = [], []

    close = shutdown

    # -- one training step ----------------------------------------------------------------------

    def train_step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> StepMetrics:
        """One optimizer step over ``micro_batches``: dp × micro-batches per replica, a contiguous block per replica."""
        if self.colocated:
            t0 = time.perf_counter()
            m = self._get(self.rt.call(self.local, "train_step", self.rt.put(micro_batches)), what="the step")[0]
            self.step += 1
            seconds = time.perf_counter() - t0
            self.timings = {"graph/step_s": seconds, "compute_s/colocated": m.seconds,
                            "wait_s/colocated": max(seconds - m.seconds, 0.0)}  # fmt: skip
            m.extra.update(self.timings)
            return m
        t0 = time.perf_counter()
        tc = self.cfg.train
        n = len(micro_batches)
        if n % self.dp:
            raise ValueError(f"{n} micro-batches cannot be split over parallel.dp={self.dp} replicas")
        M = n // self.dp
        batches = [[self.rt.put(micro_batches[r * M + m]) for m in range(M)] for r in range(self.dp)]
        groups = [[(r, m) for r in range(self.dp)] for m in range(M)]
        self._forward(groups, batches, train=True, scale=1.0 / n)
        self._backward(groups)
        if self.dp > 1 and isinstance(self.rt, _InProcess):
            _sum_replica_grads(self.stages)
        t_submit = time.perf_counter()
        reports = self._get(
            [self.rt.call(a, "finish")[0] for a in self.actors()], what="the step's forward and backward"
        )
        t_wait = time.perf_counter()
        stage_reports = reports[: self.dp * self.pp]
        shard_reports = reports[self.dp * self.pp :]
        grad_norm = math.sqrt(sum(r["sumsq"] for r in reports))
        clip = 1.0
        if tc.grad_clip > 0:
            clip = min(tc.grad_clip / (grad_norm + 1e-6), 1.0)
        lr = cosine_lr(self.step, tc.steps, tc.lr, tc.warmup_steps, tc.min_lr_ratio)
        loads = torch.zeros_like(self.biases)
        for rep in stage_reports:
            for layer, counts in rep["loads"].items():
                loads[self.placement.moe_layers.index(layer)] += counts
        gamma = gamma_at(self.step, tc.steps, tc.bias_update_speed, tc.bias_update_speed_final)
        if gamma != 0 and loads.numel():
            self.biases = self.biases + bias_delta(loads, gamma)
        self._get(
            [self.rt.call(a, "apply_step", lr, clip, self._biases_for(a_stage))[0]
             for a, a_stage in zip(self.actors(), self._actor_stages())],
            what="the optimizer step",
        )  # fmt: skip
        stats = [s for rep in stage_reports for s in rep["stats"]]
        main = sum(s["main"] for s in stats) / n
        mtp_vals = [s["mtp"] for s in stats if s["mtp"] is not None]
        mtp = sum(mtp_vals) / n if mtp_vals else None
        aux = sum(rep["aux"] for rep in stage_reports) / n if self.cfg.train.seq_aux_alpha > 0 else None
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
        metrics = StepMetrics(
            step=self.step,
            loss=loss,
            main_loss=main,
            mtp_loss=mtp,
            aux_loss=aux,
            lr=lr,
            grad_norm=grad_norm,
            tokens=sum(s["tokens"] for s in stats),
            seconds=seconds,
            loads=loads,
            max_vio=max_violation(loads) if loads.numel() else torch.zeros(0),
            bias_min=float(self.biases.min()) if self.biases.numel() else 0.0,
            bias_max=float(self.biases.max()) if self.biases.numel() else 0.0,
            extra=dict(self.timings),
        )
        self.step += 1
        return metrics

    def _actor_stages(self) -> list[int | None]:
        return [s for _ in range(self.dp) for s in range(self.pp)] + [None] * self.ep

    def _biases_for(self, stage: int | None) -> dict[int, torch.Tensor]:
        if stage is None:
            return {}
        return {
            layer: self.biases[self.placement.moe_layers.index(layer)].clone() for layer in self.moe_by_stage[stage]
        }

    def _moe_run(self, stage: int, train: bool) -> list[int]:
        """The MoE layers stage ``stage`` runs: the MTP modules' only when training with mtp_lambda > 0."""
        mtp = train and self.cfg.train.mtp_lambda > 0
        return [layer for layer in self.moe_by_stage[stage] if mtp or layer < self.cfg.model.num_hidden_layers]

    def _forward(self, groups: list[list[tuple[int, Any]]], batches: Any, train: bool, scale: float = 1.0) -> None:
        """Submit the forward of every micro-batch: stage by stage, MoE layer by MoE layer, micro-batch by micro-batch.

        ``groups`` lists the micro-batches whose dispatch buffers a shard takes in one call:
        (replica, key) pairs, one per replica in training."""
        rt, ep = self.rt, self.ep
        carry: dict = {}
        emb: dict = {}
        for s in range(self.pp):
            outs: dict = {}
            for group in groups:
                for r, key in group:
                    st = self.stages[r][s]
                    batch = batches[r][key] if train else batches[key]
                    if s == 0 and train and self.mtp_across_stages:
                        emb[(r, key)] = rt.call(st, "mtp_embed", key, batch)[0]
                    mtp = emb.get((r, key)) if s == self.pp - 1 else None
                    outs[(r, key)] = rt.call(
                        st, "forward_begin", key, batch, carry.get((r, key)), mtp, scale, train, n=ep + 2
                    )
            for layer in self._moe_run(s, train):
                for group in groups:
                    skey = group[0][1]
                    shard_outs = [
                        rt.call(
                            self.shards[k],
                            "forward",
                            layer,
                            skey,
                            train,
                            *[outs[(r, key)][k] for r, key in group],
                            n=len(group),
                        )
                        for k in range(ep)
                    ]
                    for i, (r, key) in enumerate(group):
                        outs[(r, key)] = rt.call(
                            self.stages[r][s], "forward_resume", key, *[so[i] for so in shard_outs], n=ep + 2
                        )
            carry = {rk: o[ep] for rk, o in outs.items()}

    def _backward(self, groups: list[list[tuple[int, Any]]]) -> None:
        rt, ep = self.rt, self.ep
        grad: dict = {}
        mtp_grad: dict = {}
        for s in reversed(range(self.pp)):
            outs: dict = {}
            for group in groups:
                for r, key in group:
                    outs[(r, key)] = rt.call(self.stages[r][s], "backward_begin", key, grad.get((r, key)), n=ep + 2)
            for layer in reversed(self._moe_run(s, True)):
                for group in groups:
                    skey = group[0][1]
                    shard_grads = [
                        rt.call(
                            self.shards[k],
                            "backward",
                            layer,
                            skey,
                            *[outs[(r, key)][k] for r, key in group],
                            n=len(group),
                        )
                        for k in range(ep)
                    ]
                    for i, (r, key) in enumerate(group):
                        outs[(r, key)] = rt.call(
                            self.stages[r][s], "backward_resume", key, *[sg[i] for sg in shard_grads], n=ep + 2
                        )
            grad = {rk: o[ep] for rk, o in outs.items()}
            if s == self.pp - 1 and self.mtp_across_stages:
                mtp_grad = {rk: o[ep + 1] for rk, o in outs.items()}
            if s == 0 and self.mtp_across_stages:
                for (r, key), g in mtp_grad.items():
                    rt.call(self.stages[r][0], "mtp_embed_backward", key, g)

    # -- evaluation -----------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, torch.Tensor]:
        """Mean main loss and MaxVio_global per main MoE layer over ``batches`` (forward only, spread over replicas)."""
        if self.colocated:
            ref = self.rt.call(self.local, "evaluate", self.rt.put(batches))
            return self._get(ref, long=True, what="evaluation")[0]
        refs = {f"eval{i}": self.rt.put(b) for i, b in enumerate(batches)}
        groups = [[(i % self.dp, f"eval{i}")] for i in range(len(batches))]
        self._forward(groups, refs, train=False)
        reports = self._get(
            [self.rt.call(self.stages[r][s], "eval_result")[0] for r in range(self.dp) for s in range(self.pp)],
            long=True,
            what="evaluation",
        )
        loss_sum = sum(rep["loss_sum"] for rep in reports)
        tokens = sum(rep["tokens"] for rep in reports)
        loads = torch.zeros_like(self.biases)
        for rep in reports:
            for layer, counts in rep["loads"].items():
                loads[self.placement.moe_layers.index(layer)] += counts
        loads = loads[: self.cfg.model.num_moe_layers]
        return loss_sum / max(tokens, 1), max_violation(loads) if loads.numel() else torch.zeros(0)

    # -- checkpoints ----------------------------------------------------------------------------

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's state dict (experts stacked), gathered from the actors: for tests and export."""
        from raymoe.platform.checkpoint.sharded import stack_experts

        if self.colocated:
            return self._get(self.rt.call(self.local, "model_state"), long=True, what="reading the model")[0]
        owners = [self.stages[0][s] for s in range(self.pp)] + list(self.shards)
        parts = self._get([self.rt.call(a, "state_tensors")[0] for a in owners], long=True, what="reading the model")
        merged = {k: v for part in parts for k, v in part.items() if not k.startswith(OPTIMIZER_PREFIX)}
        return stack_experts(merged, self.cfg.model.n_routed_experts)

    def save_checkpoint(self, root: str, state: dict[str, Any], extra_files: list | None = None) -> str:
        """Every actor writes its tensors, the driver the rest; visible only when complete. Returns its location."""
        writing, final = begin_checkpoint(str(root), self.step)
        try:
            if self.colocated:
                calls = [self.rt.call(self.local, "save", writing, "model-00.safetensors")[0]]
            else:
                calls = [self.rt.call(self.stages[0][s], "save", writing, f"stage-{s:02d}.safetensors")[0]
                         for s in range(self.pp)]  # fmt: skip
                calls += [
                    self.rt.call(a, "save", writing, f"experts-{k:02d}.safetensors")[0]
                    for k, a in enumerate(self.shards)
                ]
            try:
                written = self._get(calls, long=True, what="writing a checkpoint")
            except GraphError:
                self._settle(calls)  # let the live actors finish writing before the folder is removed
                raise
            weight_map = {name: file for file, names in written for name in names}
            self._write_extras(writing, extra_files or [])
            biases = self._current_biases()
            full = {
                "step": self.step,
                "engine": "graph",
                "parallel": {"dp": self.dp, "pp": self.pp, "ep": self.ep},
                "placement": self.placement.to_dict(),
                "biases": biases.tolist(),
                "rng": rng_state(),
                **state,
            }
            path = commit_checkpoint(writing, final, full, weight_map)
        except BaseException:
            abort_checkpoint(writing, final)
            raise
        logger.info("checkpoint of step %d written to %s", self.step, path)
        return path

    def _settle(self, refs: list) -> None:
        if isinstance(self.rt, _Ray):
            import ray

            ray.wait(refs, num_returns=len(refs), timeout=self.rt.timeout_s)

    def _current_biases(self) -> torch.Tensor:
        if self.colocated:
            return self._get(self.rt.call(self.local, "biases"), long=True, what="reading the biases")[0]
        return self.biases

    def _write_extras(self, directory: str, extra_files: list) -> None:
        import json

        from raymoe.platform.config import model_config_to_hf

        fs, path = filesystem(directory)
        with fs.open_output_stream(join(path, "config.json")) as f:
            f.write(json.dumps(model_config_to_hf(self.cfg.model), indent=2).encode())
        for extra in extra_files:
            with open(extra, "rb") as src, fs.open_output_stream(join(path, os.path.basename(str(extra)))) as f:
                f.write(src.read())

    def load_checkpoint(self, path: str) -> dict[str, Any]:
        """Restore every actor from a checkpoint of any layout (re-sharding as needed); returns its state."""
        from raymoe.platform.checkpoint.sharded import STATE_FILE, is_sharded_checkpoint, read_json

        state = read_json(str(path), STATE_FILE)
        self._get([self.rt.call(a, "load", str(path))[0] for a in self.actors()], long=True, what=f"loading {path}")
        self.step = int(state["step"])
        if self.colocated:
            self._get(self.rt.call(self.local, "set_step", self.step), what="loading")
        elif is_sharded_checkpoint(str(path)) and "biases" in state:
            self.biases = torch.tensor(state["biases"], dtype=torch.float32).reshape(self.biases.shape)
        else:
            self.biases = _biases_from(str(path), self.placement, self.cfg)
        if "rng" in state:
            set_rng_state(state["rng"])
        return state


def _biases_from(path: str, placement: Placement, cfg: RaymoeConfig) -> torch.Tensor:
    from raymoe.platform.checkpoint.training import read_training_tensors
    from raymoe.platform.model.transformer import moe_prefix

    names = [
        f"{moe_prefix(layer, cfg.model.num_hidden_layers)}.gate.e_score_correction_bias"
        for layer in placement.moe_layers
    ]
    tensors = read_training_tensors(path, names, cfg.model)
    if not names:
        return torch.zeros(0, cfg.model.n_routed_experts)
    return torch.stack([tensors[n].float() for n in names])


def _sum_replica_grads(stages: list[list[AttentionStage]]) -> None:
    """In-process stand-in for the replicas' all-reduce: every replica gets the sum, added in replica order."""
    for s in range(len(stages[0])):
        replicas = [row[s] for row in stages]
        for params in zip(*[[p for _, p in rep.params] for rep in replicas]):
            grads = [p.grad for p in params if p.grad is not None]
            if grads:
                total = torch.stack(grads).sum(0)
                for p in params:
                    p.grad = total.clone()


def ensure_ray() -> None:
    """Join the cluster at ``RAY_ADDRESS`` when set (as ``ray job submit`` does), else start a local Ray in-process."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(include_dashboard=False, log_to_driver=True, configure_logging=False)


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
