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
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from raymoe.actors.driver import actor_options
from raymoe.actors.messages import InferInput, StageOutput, StageRefs
from raymoe.actors.placement import build_placement
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
    ) -> None:
        parallel = ParallelConfig(pp=pp, ep=ep, num_cpus_per_actor=num_cpus_per_actor,
                                  num_gpus_per_actor=num_gpus_per_actor, timeout_s=timeout_s,
                                  long_timeout_s=start_timeout_s, placement=placement)  # fmt: skip
        self.cfg = model_config
        run_cfg = dataclasses.replace(RaymoeConfig(), model=model_config, parallel=parallel)
        self.placement = build_placement(model_config, parallel)
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

    def stats(self) -> dict:
        return {"runner": "graph", "param_bytes": 0, "actor_pids": self.actor_pids,
                "actor_param_bytes": self.actor_param_bytes}  # fmt: skip

    def close(self) -> None:
        self.rt.close()
        self.stages, self.shards = [], []
