"""The actor graph in inference mode: the serving engine's runner over stages and expert shards.

``InferenceStage`` holds the non-expert part of a range of layers (as in training, a
:class:`~raymoe.platform.model.transformer.StageModel`) and the block latent cache of *its* layers;
``InferenceShard`` holds the routed experts the placement gives it, for every MoE layer. The
stage runs :func:`~raymoe.platform.inference.forward.run_blocks`, the generator the single process
runs, and at each MoE layer hands the driver one dispatch buffer per shard (each token row once
per shard, with the experts it chose there); the driver sends each buffer to its shard and the
shards' weighted sums back to the stage. :class:`GraphRunner` has the methods of
:class:`~raymoe.platform.inference.runner.LocalRunner`, so the engine does not know which it drives.

Every wait has a timeout; a dead actor is a :class:`~raymoe.actors.stage.GraphError` naming it,
which ends the engine (and, under Serve, the replica, which Serve replaces).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from raymoe.actors.driver import _InProcess, _Ray, ensure_ray
from raymoe.actors.placement import Placement, build_placement
from raymoe.actors.stage import GraphError, set_threads
from raymoe.platform.config import ModelConfig, ParallelConfig
from raymoe.platform.inference.batch import StepBatch
from raymoe.platform.inference.cache import BlockCache
from raymoe.platform.inference.forward import ExpertCall, mtp_program, rope, run_blocks
from raymoe.platform.model.moe import Experts, MoE, dispatch_rows, experts_on_rows
from raymoe.platform.model.transformer import DeepseekV3, StageModel, moe_prefix

logger = logging.getLogger(__name__)

DONE = -1  # the status a stage returns when its program finished


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> None:
    from raymoe.platform.generate import prepare_for_inference

    prepare_for_inference(module, dtype)


class InferenceStage:
    """Stage ``stage`` of the placement: its layers without routed experts, and their latent cache."""

    def __init__(
        self,
        cfg: ModelConfig,
        placement: Placement,
        stage: int,
        state: dict[str, torch.Tensor],
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
    ) -> None:
        set_threads(0.0, peers=1)  # stages take turns: each may use every core
        start, end = placement.stage_bounds[stage]
        self.first, self.last = stage == 0, stage == placement.pp - 1
        self.module = StageModel(cfg, start, end, self.first, self.last)
        missing, unexpected = self.module.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith(("rotary_emb.cos", "rotary_emb.sin"))]
        if missing or unexpected:
            raise ValueError(f"stage {stage}: weights missing {missing[:3]}, unexpected {unexpected[:3]}")
        _cast(self.module, dtype)
        self.blocks = self.module.blocks()
        self.main_blocks = [b for b in self.blocks if b.self_attn.layer_id < cfg.num_hidden_layers]
        layers = [b.self_attn.layer_id for b in self.blocks]
        self.cache = BlockCache(layers, num_blocks, block_size, cfg.kv_lora_rank + cfg.qk_rope_head_dim, dtype)
        self.ep = placement.ep
        self.routing: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for block in self.blocks:
            if isinstance(block.mlp, MoE):
                layer = block.self_attn.layer_id
                self.routing[layer] = placement.routing(layer)
        self.program = None
        self.finish = None
        self.pending: tuple[ExpertCall, list[torch.Tensor]] | None = None

    def ready(self) -> dict:
        return {"pid": os.getpid(), "layers": [b.self_attn.layer_id for b in self.blocks]}

    @torch.inference_mode()
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """First stage: the embeddings of ``tokens`` (the MTP module's input when it sits on another stage)."""
        return self.module.model.embed_tokens(tokens)

    @torch.inference_mode()
    def begin(self, kind: str, batch: StepBatch, x: torch.Tensor, rows: Any, emb: torch.Tensor | None = None) -> list:
        """Start the main layers (``kind`` "main"; x = token ids on the first stage, else hidden rows) or the
        MTP module ("mtp", last stage; x = the main model's hidden rows, emb = the next tokens' embeddings).
        Returns [status, *per-shard buffers]: the MoE layer waiting for experts, or DONE and the output."""
        m = self.module.model
        if kind == "main":
            h = m.embed_tokens(x) if self.first else x
            cos, sin = rope(m.rotary_emb, batch, h.dtype)
            self.program = run_blocks(self.main_blocks, h, batch, self.cache, cos, sin)
            self.finish = (lambda h: self._head(h, rows)) if self.last else (lambda h: h)
        else:
            module = m.mtp["0"]
            emb = m.embed_tokens(batch.tokens) if emb is None else emb
            self.program = mtp_program(module, x, emb, batch, self.cache, m.rotary_emb)
            self.finish = lambda h: self.module.lm_head(module.shared_head.norm(h.index_select(0, rows))).float()
        return self._advance(None)

    @torch.inference_mode()
    def resume(self, *outs: torch.Tensor) -> list:
        """Continue with each shard's output for the pending MoE layer."""
        call, rows = self.pending
        y = torch.zeros_like(call.x)
        for r, out in zip(rows, outs):
            y.index_add_(0, r, out.to(y.dtype))
        return self._advance(y)

    def _head(self, h: torch.Tensor, rows: tuple[torch.Tensor, torch.Tensor | None]) -> tuple:
        logit_rows, hidden_rows = rows
        h = self.module.model.norm(h)
        logits = self.module.lm_head(h.index_select(0, logit_rows)).float()
        return logits, (h.index_select(0, hidden_rows) if hidden_rows is not None else None)

    def _advance(self, y: torch.Tensor | None) -> list:
        try:
            call = next(self.program) if y is None else self.program.send(y)
        except StopIteration as stop:
            self.program, self.pending = None, None
            return [DONE, self.finish(stop.value), *([None] * (self.ep - 1))]
        shards, local = self.routing[call.layer]
        bufs = dispatch_rows(call.idx, call.weights, shards, local, self.ep)
        self.pending = (call, [rows for rows, _, _ in bufs])
        return [call.layer, *[(call.x.index_select(0, rows), ids, w) for rows, ids, w in bufs]]


class InferenceShard:
    """Expert shard ``shard``: the routed experts the placement gives it, for every MoE layer."""

    def __init__(self, cfg: ModelConfig, experts: dict[int, tuple[torch.Tensor, torch.Tensor]], peers: int, dtype):
        set_threads(0.0, peers=peers)  # shards compute at the same time: they share the cores
        self.experts: dict[int, Experts] = {}
        for layer, (gate_up, down) in experts.items():
            e = Experts(gate_up.shape[0], cfg.hidden_size, cfg.moe_intermediate_size)
            e.gate_up_proj.data, e.down_proj.data = gate_up.to(dtype), down.to(dtype)
            self.experts[layer] = e.eval()

    def ready(self) -> dict:
        return {"pid": os.getpid(), "layers": sorted(self.experts)}

    @torch.inference_mode()
    def run(self, layer: int, buffer: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, local_ids, w = buffer
        return experts_on_rows(self.experts[layer], x, local_ids, w)


def _on_stage(name: str, placement: Placement, stage: int) -> bool:
    """Whether state-dict entry ``name`` of the full model belongs to stage ``stage``."""
    parts = name.split(".")
    if parts[:2] == ["model", "layers"]:
        return placement.stage_of(int(parts[2])) == stage
    if name.startswith("model.embed_tokens."):
        return stage == 0
    return stage == placement.pp - 1  # final norm, output head, MTP modules


class GraphRunner:
    """The engine's runner on the actor graph: ``pp`` stages and ``ep`` expert shards (one replica).

    Args:
        model: the loaded model (its weights are cut into the actors; the runner keeps none).
        num_blocks, block_size: the cache pool (every stage holds it for its own layers).
        pp, ep: stages and expert shards.
        in_process: plain objects in this process instead of Ray actors (tests of the math).
        timeout_s: the longest wait on one actor call.
        start_timeout_s: the longest wait for the actors to start (they import torch and load weights).
        num_cpus_per_actor: Ray resources of each actor.
    """

    def __init__(
        self,
        model: DeepseekV3,
        num_blocks: int,
        block_size: int,
        pp: int = 1,
        ep: int = 1,
        in_process: bool = False,
        timeout_s: float = 60.0,
        num_cpus_per_actor: float = 0.0,
        start_timeout_s: float = 600.0,
    ) -> None:
        self.cfg = model.cfg
        self.num_blocks, self.block_size = num_blocks, block_size
        self.placement = build_placement(self.cfg, ParallelConfig(pp=pp, ep=ep))
        self.pp, self.ep = self.placement.pp, ep
        self.has_mtp = self.cfg.num_nextn_predict_layers > 0
        self.timeout_s = timeout_s
        self.rt = _InProcess(timeout_s) if in_process else _Ray(timeout_s)
        if not in_process:
            ensure_ray()
        dtype = model.lm_head.weight.dtype
        state = {k: v for k, v in model.state_dict().items() if ".experts." not in k}
        options: dict[str, Any] = {"num_cpus": num_cpus_per_actor, "max_restarts": 0}
        if "OMP_WAIT_POLICY" not in os.environ:  # actors take turns on shared cores: idle threads sleep
            options["runtime_env"] = {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}}
        self.stages, self.shards, self.labels = [], [], {}
        try:
            for s in range(self.pp):
                own = {k: v for k, v in state.items() if _on_stage(k, self.placement, s)}
                actor = self.rt.make(InferenceStage, options, self.cfg, self.placement, s, own, num_blocks,
                                     block_size, dtype)  # fmt: skip
                self.stages.append(actor)
                self._label(actor, f"InferenceStage({s})")
            full = model.state_dict()
            for k in range(ep):
                experts = {}
                for layer in self.placement.moe_layers:
                    ids = torch.tensor(self.placement.experts_on(k, layer))
                    prefix = f"{moe_prefix(layer, self.cfg.num_hidden_layers)}.experts"
                    experts[layer] = (full[f"{prefix}.gate_up_proj"][ids], full[f"{prefix}.down_proj"][ids])
                actor = self.rt.make(InferenceShard, options, self.cfg, experts, ep, dtype)
                self.shards.append(actor)
                self._label(actor, f"InferenceShard({k})")
            refs = [self.rt.call(a, "ready")[0] for a in self.stages + self.shards]
            ready = self._get(refs, "starting the actors", start_timeout_s)
            labels = [f"InferenceStage({s})" for s in range(self.pp)] + [f"InferenceShard({k})" for k in range(ep)]
            self.actor_pids = {label: info["pid"] for label, info in zip(labels, ready)}
        except BaseException:
            self.close()
            raise
        logger.info("inference graph: %d stages, %d expert shards", self.pp, ep)

    def _label(self, actor: Any, label: str) -> None:
        if isinstance(self.rt, _Ray):
            self.labels[actor._actor_id.hex()] = label

    def _get(self, refs: list, what: str, timeout_s: float | None = None) -> list:
        if isinstance(self.rt, _InProcess):
            return refs
        import ray

        try:
            return ray.get(refs, timeout=timeout_s or self.timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise GraphError(f"inference: {what} took longer than {timeout_s or self.timeout_s:g} s") from None
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
            dead = self._dead_actors()
            if dead:  # an error can surface on a live actor whose input came from the dead one: name the dead
                raise GraphError(f"inference: {', '.join(dead)} died while {what}") from exc
            cause = getattr(exc, "cause", None) or exc
            raise GraphError(f"inference: an actor failed while {what}: {type(cause).__name__}: {cause}") from exc

    def _dead_actors(self, timeout_s: float = 5.0) -> list[str]:
        """Labels of the graph's actors that no longer answer."""
        import ray

        labels = list(self.labels.values())
        refs = [a.ready.remote() for a in self.stages + self.shards]
        dead = []
        for label, ref in zip(labels, refs):
            try:
                ray.get(ref, timeout=timeout_s)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                dead.append(label)
        return dead

    def _run_stage(self, s: int, kind: str, batch: Any, x: Any, rows: Any, emb: Any = None) -> Any:
        """Run one stage's program to its end, sending its dispatches to the shards; a ref to its output."""
        n = 1 + self.ep
        status, *bufs = self.rt.call(self.stages[s], "begin", kind, batch, x, rows, emb, n=n)
        while True:
            (layer,) = self._get([status], f"stage {s} ({kind})")
            if layer == DONE:
                return bufs[0]
            outs = [self.rt.call(self.shards[k], "run", layer, bufs[k])[0] for k in range(self.ep)]
            status, *bufs = self.rt.call(self.stages[s], "resume", *outs, n=n)

    def main(self, batch: StepBatch, logit_rows: torch.Tensor, hidden_rows: torch.Tensor | None = None):
        batch_ref = self.rt.put(batch)
        x: Any = batch.tokens
        for s in range(self.pp):
            x = self._run_stage(s, "main", batch_ref, x, (logit_rows, hidden_rows) if s == self.pp - 1 else None)
        (out,) = self._get([x], "the main forward")
        return out

    def mtp(self, batch: StepBatch, hidden: torch.Tensor, logit_rows: torch.Tensor) -> torch.Tensor:
        emb = None
        if self.pp > 1:  # the embedding lives on the first stage
            emb = self.rt.call(self.stages[0], "embed", batch.tokens)[0]
        out = self._run_stage(self.pp - 1, "mtp", batch, hidden, logit_rows, emb)
        (logits,) = self._get([out], "the MTP draft")
        return logits

    def close(self) -> None:
        if isinstance(self.rt, _Ray):
            import ray

            for actor in self.stages + self.shards:
                try:
                    ray.kill(actor)
                except Exception:  # already dead
                    pass
        self.stages, self.shards = [], []
