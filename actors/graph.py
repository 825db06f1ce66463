"""The actor graph serving: the engine's runner over inference-mode stages and expert shards.

:class:`GraphRunner` has the methods of :class:`~raymoe.platform.inference.runner.LocalRunner`, so the
serving engine does not know which it drives. Its actors are the training graph's
(:class:`~raymoe.actors.stage.Stage`, :class:`~raymoe.actors.shard.Shard`) in inference mode: each
stage holds its layers (without routed experts) and the paged latent cache of those layers, each
shard its experts, and **each loads its own share of the checkpoint**; the runner (and the Serve
replica that holds it) holds no weights. A step's whole schedule (every stage, every MoE layer's
dispatch to the shards and back) is submitted at once; the runner waits once, for the logits.

Every wait has a timeout; a dead actor is a :class:`~raymoe.actors.runtime.GraphError` naming it,
which ends the engine (and, under Serve, the replica, which Serve replaces).

**Hot experts and live re-placement.** The stages count the tokens routed to each expert, the
shards the (row, expert) pairs they compute. With ``rebalance_every=N`` the runner recomputes the
placement from the live counts before every N-th step (the last N steps' plus ``decay`` times the
previous estimate)
(:func:`~raymoe.actors.placement.balanced_placement`, with ``redundant`` extra copies of the
hottest experts per layer) and, when it lowers max/mean tokens per shard by ``min_gain`` or more,
applies it there, between two steps: the shards pass each other
the experts that move (actor to actor, never through the runner), then every stage routes by the
new placement. The sequences in flight and their latent caches stay where they are (on the
stages), so no request notices but for one slower step.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from raymoe.actors.driver import actor_options
from raymoe.actors.messages import InferInput, StageOutput, StageRefs
from raymoe.actors.placement import (
    Placement,
    balanced_placement,
    build_placement,
    imbalance,
    relabel_like,
    shard_loads,
)
from raymoe.actors.runtime import actor_bundle, make_runtime
from raymoe.actors.shard import Shard
from raymoe.actors.stage import ServingSpec, Stage
from raymoe.platform.config import ParallelConfig, RaymoeConfig
from raymoe.platform.inference.batch import StepBatch
from raymoe.platform.model.attention import naive_min_run

logger = logging.getLogger(__name__)


class GraphRunner:
    """The engine's runner on the actor graph: ``pp`` stages and ``ep`` expert shards (one replica).

    Args:
        checkpoint: the checkpoint every actor loads its share from (local path or URI; resolved).
        model_config: its model config (read from its headers, no weights).
        num_blocks, block_size: the cache pool (every stage holds it for its own layers).
        pp, ep: stages and expert shards.
        dtype: the serving dtype of the weights and the cache.
        device: where the actors compute: ``auto`` (CUDA when an actor sees a GPU), ``cpu`` or ``cuda``.
        in_process: plain objects in this process instead of Ray actors (tests of the math).
        timeout_s: the longest wait on one step.
        start_timeout_s: the longest wait for the actors to start (they import torch and load weights).
        num_cpus_per_actor, num_gpus_per_actor: Ray resources of each actor.
        placement: the placement group's strategy: ``auto``, ``PACK`` or ``SPREAD`` over the nodes.
        expert_loads: [MoE layers, E] loads to place the experts by at the start
            (:func:`~raymoe.actors.placement.balanced_placement`; None: contiguous blocks).
        redundant: extra expert copies per MoE layer whenever the runner places by loads.
        rebalance_every: re-place the experts from the live counts every this many steps (0: never).
        min_gain: re-place only when it lowers max/mean tokens per shard (of the window's counts) by at
            least this much; otherwise the experts stay where they are.
        decay: the live loads a re-placement follows are the counts of each interval plus ``decay`` times
            the previous estimate (0: the last interval alone).
    """

    def __init__(
        self,
        checkpoint: str,
        model_config: Any,
        num_blocks: int,
        block_size: int,
        pp: int = 1,
        ep: int = 1,
        dtype: torch.dtype = torch.bfloat16,
        device: str = "auto",
        in_process: bool = False,
        timeout_s: float = 60.0,
        start_timeout_s: float = 600.0,
        num_cpus_per_actor: float = 0.0,
        num_gpus_per_actor: float = 0.0,
        placement: str = "auto",
        expert_loads: torch.Tensor | None = None,
        redundant: int = 0,
        rebalance_every: int = 0,
        min_gain: float = 0.05,
        decay: float = 0.9,
    ) -> None:
        parallel = ParallelConfig(pp=pp, ep=ep, num_cpus_per_actor=num_cpus_per_actor,
                                  num_gpus_per_actor=num_gpus_per_actor, timeout_s=timeout_s,
                                  long_timeout_s=start_timeout_s, placement=placement)  # fmt: skip
        self.cfg = model_config
        run_cfg = dataclasses.replace(RaymoeConfig(), model=model_config, parallel=parallel)
        self.parallel, self.redundant, self.rebalance_every = parallel, redundant, rebalance_every
        if rebalance_every < 0:
            raise ValueError(f"rebalance_every must be >= 0, got {rebalance_every}")
        if expert_loads is not None:
            self.placement = balanced_placement(model_config, parallel, expert_loads, redundant)
        else:
            self.placement = build_placement(model_config, parallel)
            zeros = torch.zeros(len(self.placement.moe_layers), model_config.n_routed_experts)
            balanced_placement(model_config, parallel, zeros, redundant)  # checks redundant before any actor starts
        self.steps, self.rebalances, self.skipped = 0, [], 0
        self.min_gain = min_gain
        self._window_start: torch.Tensor | None = None  # the counts at the last re-placement
        self._estimate: torch.Tensor | None = None  # the decayed loads the placement follows
        self.decay = decay
        self.pp, self.ep = self.placement.pp, ep
        self.num_blocks, self.block_size = num_blocks, block_size
        self.naive_min_run = naive_min_run(model_config)
        self.has_mtp = model_config.num_nextn_predict_layers > 0
        self.rt = make_runtime(in_process, timeout_s, start_timeout_s, where="inference")
        spec = ServingSpec(checkpoint=checkpoint, dtype=dtype, num_blocks=num_blocks, block_size=block_size,
                           device=device)  # fmt: skip
        options = actor_options(run_cfg, many=True)
        try:
            bundle = actor_bundle(num_cpus_per_actor, num_gpus_per_actor)
            self.rt.reserve([bundle] * (self.pp + ep), parallel.placement, parallel.reserve_timeout_s)
            self.stages = [self.rt.make(Stage, f"Stage({s})", options, run_cfg, self.placement, 0, s, False, spec)
                           for s in range(self.pp)]  # fmt: skip
            self.shards = [self.rt.make(Shard, f"Shard({k})", options, run_cfg, self.placement, k, spec)
                           for k in range(ep)]  # fmt: skip
            ready = self.rt.get([self.rt.call(a, "ready")[0] for a in self.stages + self.shards],
                                "starting the actors", long=True)  # fmt: skip
        except BaseException:
            self.close()
            raise
        self.actor_pids = {label: info["pid"] for label, info in zip(self.rt.labels, ready)}
        self.rt.record(ready)
        self.actor_param_bytes = {label: info["param_bytes"] for label, info in zip(self.rt.labels, ready)}
        self.moe_main = [[layer for layer in self.placement.moe_layers
                          if layer < model_config.num_hidden_layers and self.placement.stage_of(layer) == s]
                         for s in range(self.pp)]  # fmt: skip
        self.moe_mtp = [layer for layer in self.placement.moe_layers if layer == model_config.num_hidden_layers]
        logger.info("inference graph: %d stages, %d expert shards; parameter bytes %s", self.pp, ep,
                    self.actor_param_bytes)  # fmt: skip

    def _run_stage(self, s: int, inputs: Any, prev: Any, layers: list[int], emb: Any = None) -> Any:
        """Submit one stage's program with its dispatches to the shards; a reference to its StageOutput."""
        n = 1 + self.ep
        out = StageRefs.of(self.rt.call(self.stages[s], "begin", "step", inputs, prev, emb, n=n))
        for layer in layers:
            outs = [self.rt.call(self.shards[k], "forward", layer, "step", False, out.buffers[k])[0]
                    for k in range(self.ep)]  # fmt: skip
            out = StageRefs.of(self.rt.call(self.stages[s], "resume", "step", *outs, n=n))
        return out.output

    def main(self, batch: StepBatch, logit_rows: torch.Tensor, hidden_rows: torch.Tensor | None = None):
        if self.rebalance_every and self.steps and self.steps % self.rebalance_every == 0:
            self.rebalance()  # a step boundary: the previous step (main and MTP draft) is done
        self.steps += 1
        inputs = self.rt.put(InferInput("main", batch, logit_rows, hidden_rows))
        prev = None
        for s in range(self.pp):
            prev = self._run_stage(s, inputs, prev, self.moe_main[s])
        (out,) = self.rt.get([prev], "the main forward")
        return out.logits, out.hidden

    def mtp(self, batch: StepBatch, hidden: torch.Tensor, logit_rows: torch.Tensor) -> torch.Tensor:
        emb = None
        if self.pp > 1:  # the embedding lives on the first stage
            emb = self.rt.call(self.stages[0], "embed", batch.tokens)[0]
        inputs = InferInput("mtp", batch, logit_rows)
        out = self._run_stage(self.pp - 1, inputs, StageOutput(hidden=hidden), self.moe_mtp, emb)
        (result,) = self.rt.get([out], "the MTP draft")
        return result.logits

    # -- expert loads and live re-placement ----------------------------------------------------

    def expert_loads(self) -> dict:
        """The tokens routed to each expert since the start, every MoE layer (the local runner's ``expert_loads``)."""
        parts = self.rt.get([self.rt.call(st, "expert_loads")[0] for st in self.stages], "reading the expert loads")
        by_layer = {layer: (t, row) for part in parts for layer, t, row in zip(part["layers"], part["tokens"],
                                                                             part["loads"])}  # fmt: skip
        layers = list(self.placement.moe_layers)
        return {"layers": layers, "tokens": [by_layer[layer][0] for layer in layers],
                "loads": [by_layer[layer][1] for layer in layers]}  # fmt: skip

    def shard_tokens(self) -> torch.Tensor:
        """[MoE layers, ep]: the (row, expert) pairs each expert shard computed since the start, per layer."""
        parts = self.rt.get([self.rt.call(sh, "served")[0] for sh in self.shards], "reading the shards' loads")
        return torch.tensor([part["tokens"] for part in parts], dtype=torch.long).T

    def rebalance(self, loads: torch.Tensor | None = None) -> Placement:
        """Place the experts by ``loads`` [MoE layers, E] (default: the live estimate, the counts since the last
        re-placement plus ``decay`` times the previous estimate) with ``redundant`` copies of the hottest, shard
        labels kept where they were (:func:`~raymoe.actors.placement.relabel_like`), and apply it now when it
        lowers max/mean tokens per shard for those loads by ``min_gain`` or more. Returns the placement in force."""
        if loads is None:
            now = torch.tensor(self.expert_loads()["loads"], dtype=torch.float64)
            window = now - self._window_start if self._window_start is not None else now
            self._window_start = now
            # a decayed sum of the windows: recent counts weigh most, and one noisy window does not reshuffle
            self._estimate = window if self._estimate is None else self.decay * self._estimate + window
            loads = self._estimate
        if float(loads.sum()) <= 0:
            return self.placement
        new = relabel_like(balanced_placement(self.cfg, self.parallel, loads, self.redundant), self.placement)
        now, then = imbalance(shard_loads(self.placement, loads)), imbalance(shard_loads(new, loads))
        if new != self.placement and now - then >= self.min_gain:  # moving costs a slow step: only when it pays
            self.apply_placement(new, loads)
        else:
            self.skipped += 1
        return self.placement

    def apply_placement(self, new: Placement, loads: torch.Tensor | None = None) -> None:
        """Move the experts to ``new`` (same stages and shards): each shard receives the experts it lacks from a
        shard that holds them, then every stage routes by ``new``. Call it between two steps."""
        old = self.placement
        if new.stage_bounds != old.stage_bounds or new.moe_layers != old.moe_layers or new.ep != old.ep:
            raise ValueError("a new placement may move experts only: the same stages, MoE layers and shards")
        wanted: dict[tuple[int, int], dict[int, list[int]]] = {}  # (source, destination) -> layer -> experts
        for layer in new.moe_layers:
            holders = old.holders(layer)
            for k in range(new.ep):
                have = set(old.experts_on(k, layer))
                for e in new.experts_on(k, layer):
                    if e not in have:
                        wanted.setdefault((holders[e][0], k), {}).setdefault(layer, []).append(e)
        sent: dict[int, list] = {k: [] for k in range(new.ep)}
        for (src, dst), experts in wanted.items():
            sent[dst].append(self.rt.call(self.shards[src], "export", experts)[0])
        calls = [self.rt.call(sh, "adopt", new, *sent[k])[0] for k, sh in enumerate(self.shards)]
        held = self.rt.get(calls, "moving experts between the shards", long=True)
        self.rt.get([self.rt.call(st, "set_placement", new)[0] for st in self.stages], "re-routing the stages")
        self.placement = new
        self.actor_param_bytes.update({f"Shard({k})": h["param_bytes"] for k, h in enumerate(held)})
        moved = sum(len(v) for experts in wanted.values() for v in experts.values())
        record = {"step": self.steps, "moved": moved, "replicas": new.num_replicas}
        if loads is not None:
            record |= {"imbalance_before": imbalance(shard_loads(old, loads)),
                       "imbalance_after": imbalance(shard_loads(new, loads))}  # fmt: skip
        self.rebalances.append(record)
        logger.info("experts re-placed before step %d: %d copies moved, %d replicas", self.steps, moved,
                    new.num_replicas)  # fmt: skip

    def stats(self) -> dict:
        tokens = self.shard_tokens()
        return {"runner": "graph", "param_bytes": 0, "actor_pids": self.actor_pids,
                "actor_param_bytes": self.actor_param_bytes, "expert_loads": self.expert_loads(),
                "shard_tokens": tokens.sum(0).tolist(), "shard_layer_tokens": tokens.tolist(),
                "shard_imbalance": imbalance(tokens.double()) if tokens.sum() else None,
                "expert_replicas": self.placement.num_replicas, "rebalances": list(self.rebalances),
                "rebalances_skipped": self.skipped}  # fmt: skip

    def close(self) -> None:
        self.rt.close()
        self.stages, self.shards = [], []
