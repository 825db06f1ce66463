"""The elastic, fault-tolerant actor graph: rebuild after a failure, shrink to what fits, grow back.

:class:`ElasticGraph` has the engine interface of :class:`GraphTrainer` and wraps one. When a
step fails (an actor died, hung past ``parallel.timeout_s``, or raised), it recovers by itself
(:meth:`ElasticGraph.recover`): the failure policy decides whether to go on and after what
backoff; the scaling policy picks the largest layout the cluster can place now; a new graph is
built and restored from the latest complete checkpoint (re-sharded when the layout changed);
then it raises :class:`~raymoe.platform.train.trainer.StepRewound` with that checkpoint's state,
and the training loop rewinds its data loader to that position. At every step boundary,
:meth:`ElasticGraph.at_step_boundary` grows the graph back toward ``parallel.dp``/``ep`` when
actors fit again, or resizes it on request (``raymoe resize``), by writing a checkpoint and
restoring it into the new layout: no step is lost or repeated.

A layout never changes the math: the global batch keeps its ``dp × micro_batches``
micro-batches (fewer replicas take more each), so losses stay those of the configured layout up
to floating-point summation order.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raymoe.actors.driver import GraphTrainer
from raymoe.actors.policy import FailureAction, FailurePolicy, Layout, ScalingPolicy
from raymoe.actors.runtime import GraphError, actor_bundle, ensure_ray
from raymoe.platform.checkpoint.layout import latest_checkpoint
from raymoe.platform.config import ConfigError, RaymoeConfig
from raymoe.platform.train.trainer import StepRewound

logger = logging.getLogger(__name__)

RESIZE_FILE = "resize.json"


def bundles_that_fit(bundle: dict[str, float], free_per_node: dict[str, dict[str, float]] | None = None) -> int:
    """How many copies of ``bundle`` the nodes' free resources hold, node by node (a bundle cannot span nodes)."""
    if free_per_node is None:
        free_per_node = free_resources_per_node()
    return sum(
        min(math.floor(free.get(k, 0.0) / v + 1e-9) for k, v in bundle.items()) for free in free_per_node.values()
    )


def free_resources_per_node() -> dict[str, dict[str, float]]:
    """Free resources of every alive node (node id -> resources)."""
    import ray

    try:
        from ray._private.state import available_resources_per_node

        return available_resources_per_node()
    except (ImportError, AttributeError):  # a Ray without the per-node view: one node with the cluster's sum
        return {"cluster": ray.available_resources()}


def request_resize(output: str | Path, dp: int | None = None, ep: int | None = None) -> Path:
    """Ask the driver training into ``output`` to change its layout at its next step boundary."""
    path = Path(output) / RESIZE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"dp": dp, "ep": ep}))
    os.replace(tmp, path)
    return path


class ElasticGraph:
    """A :class:`GraphTrainer` that survives actor failures and follows the resources.

    Args:
        cfg: the run's config; ``parallel`` is the largest layout, ``elastic`` the policies.
        control_dir: where ``raymoe resize`` leaves its requests (the run's output directory, when local).
        checkpoint_root: where the run's checkpoints are (``train.checkpoint_uri`` or the output).
        clock, sleep: injectable for tests.
    """

    kind = "graph"

    def __init__(
        self,
        cfg: RaymoeConfig,
        control_dir: str | Path | None = None,
        checkpoint_root: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.cfg = cfg
        self.checkpoint_root = checkpoint_root
        e, p = cfg.elastic, cfg.parallel
        self.control_dir = Path(control_dir) if control_dir is not None else None
        self.sleep = sleep
        self.failure_policy = FailurePolicy(
            max_failures=e.max_failures, window_s=e.window_s, backoff_s=e.backoff_s,
            max_backoff_s=e.max_backoff_s, clock=clock,
        )  # fmt: skip
        self.scaling = ScalingPolicy(
            max_dp=p.dp, max_ep=p.ep, micro_batches=p.micro_batches, pp=p.pp, min_dp=e.min_dp, min_ep=e.min_ep
        )
        self.wanted = self.scaling.full  # what the graph grows back to (raymoe resize changes it)
        self.failures = 0
        self.events: list[dict[str, Any]] = []
        self.layout = self._fitting(self.wanted, self.placeable(0))
        self.graph = self._build(self.layout)

    # -- the trainer interface ------------------------------------------------------------------
    # A failure in any of these is recovered from here (StepRewound tells the loop to rewind).

    @property
    def step(self) -> int:
        return self.graph.step

    def train_step(self, micro_batches: list) -> Any:
        return self._guard(self.graph.train_step, micro_batches)

    def evaluate(self, batches: list) -> Any:
        return self._guard(self.graph.evaluate, batches)

    def record(self, batches: list) -> Any:
        """The routing of ``batches`` (:meth:`GraphTrainer.record`); a failure here is not recovered from."""
        return self.graph.record(batches)

    def save_checkpoint(self, root: str, state: dict, extra_files: list | None = None) -> str:
        self.checkpoint_root = self.checkpoint_root or str(root)
        return self._guard(self.graph.save_checkpoint, root, state, extra_files)

    def load_checkpoint(self, path: str) -> dict:
        return self.graph.load_checkpoint(path)

    def describe(self) -> dict:
        return self.graph.describe() | {"elastic.min_dp": self.scaling.min_dp, "elastic.min_ep": self.scaling.min_ep}

    def close(self) -> None:
        self.graph.shutdown()

    shutdown = close

    @property
    def pids(self) -> dict[str, int]:
        return self.graph.pids

    def _guard(self, fn: Callable, *args: Any) -> Any:
        try:
            return fn(*args)
        except GraphError as exc:
            detected = time.perf_counter()
            state = self.recover(exc, self.checkpoint_root)
            metrics = {"elastic/dp": self.layout.dp, "elastic/ep": self.layout.ep}
            cause = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise StepRewound(cause, state, metrics, detected_at=detected) from exc

    # -- layouts --------------------------------------------------------------------------------

    def _cfg_for(self, layout: Layout) -> RaymoeConfig:
        parallel = dataclasses.replace(
            self.cfg.parallel, dp=layout.dp, ep=layout.ep, micro_batches=layout.micro_batches
        )
        return dataclasses.replace(self.cfg, parallel=parallel)

    def _build(self, layout: Layout) -> GraphTrainer:
        graph = GraphTrainer(self._cfg_for(layout))
        logger.info("actor graph at dp=%d ep=%d pp=%d; actor pids %s", layout.dp, layout.ep, graph.pp, graph.pids)
        return graph

    def placeable(self, held: int) -> int | None:
        """How many graph actors the cluster can hold: ``held`` already running plus the bundles that fit now.

        Counted node by node from each node's free resources (a bundle sits on one node), or None
        when actors reserve no CPU, GPU or memory of their own (then any number fits)."""
        ensure_ray()
        p = self.cfg.parallel
        if not (p.num_cpus_per_actor > 0 or p.num_gpus_per_actor > 0 or p.memory_per_actor_gb > 0):
            return None
        bundle = actor_bundle(p.num_cpus_per_actor, p.num_gpus_per_actor, p.memory_per_actor_gb)
        # resources of actors killed just now come back a moment later: read until it stops growing
        more, deadline = bundles_that_fit(bundle), time.monotonic() + 3.0
        while time.monotonic() < deadline:
            time.sleep(0.25)
            again = bundles_that_fit(bundle)
            if again <= more:
                break
            more = again
        return held + more

    # -- failures -------------------------------------------------------------------------------

    def recover(self, error: BaseException, checkpoint_root: str | None) -> dict | None:
        """After a failed step: decide, rebuild on what can be placed, restore the latest checkpoint.

        A fault while rebuilding or restoring (an actor or a node lost again, too few resources for
        now) is one more failure under the same policy, and the rebuild is tried again after its
        backoff; only the policy's limit ends the run. Returns the restored checkpoint's state (the
        loop rewinds its loader to it), or None when there is no checkpoint yet (the loop starts
        over). Raises GraphError when the failure policy gives up."""
        step = self.graph.step
        self._failed(error, step, "the step")
        while True:
            try:
                layout = self._fitting(self.wanted, self.placeable(0))
                self.graph = self._build(layout)
                ckpt = latest_checkpoint(checkpoint_root) if checkpoint_root else None
                state = self.graph.load_checkpoint(ckpt) if ckpt is not None else None
                break
            except (GraphError, ConfigError) as exc:  # the rebuild or the restore failed: count it, back off, retry
                self._failed(exc, step, "the recovery")
        if layout != self.layout:
            logger.warning("actor graph rebuilt at dp=%d ep=%d (was dp=%d ep=%d)", layout.dp, layout.ep,
                           self.layout.dp, self.layout.ep)  # fmt: skip
        self.layout = layout
        if ckpt is None:
            logger.warning("no checkpoint yet: starting over from step 0")
            return None
        logger.info("restored %s (step %d) on dp=%d ep=%d", ckpt, self.graph.step, layout.dp, layout.ep)
        return state

    def _failed(self, error: BaseException, step: int, during: str) -> None:
        """Count a failure, record it, stop the graph, and back off; GraphError when the policy gives up."""
        self.failures += 1
        cause = str(error).splitlines()[0] if str(error) else type(error).__name__
        decision = self.failure_policy.on_failure(cause)
        self.events.append({"kind": "failure", "cause": cause, "step": step, "during": during,
                            "action": decision.action.value})  # fmt: skip
        logger.warning("actor graph failure %d during %s at step %d: %s", self.failures, during, step, cause)
        try:
            self.graph.shutdown()
        except Exception:  # noqa: BLE001 - a graph that failed to build may be half made
            logger.debug("shutting down the failed graph", exc_info=True)
        if decision.action is FailureAction.RAISE:
            raise GraphError(decision.reason) from error
        if decision.delay_s:
            self.sleep(decision.delay_s)

    # -- growing --------------------------------------------------------------------------------

    def _fitting(self, wanted: Layout, placeable: int | None) -> Layout:
        """The largest allowed layout no bigger than ``wanted`` (in dp and ep) that ``placeable`` actors hold."""
        pp = self.cfg.parallel.pp
        for layout in self.scaling.layouts():
            fits = placeable is None or layout.actors(pp) <= placeable
            if layout.dp <= wanted.dp and layout.ep <= wanted.ep and fits:
                return layout
        raise ConfigError(f"only {placeable} actors can be placed; the smallest allowed layout does not fit")

    def _requested(self) -> Layout | None:
        if self.control_dir is None:
            return None
        path = self.control_dir / RESIZE_FILE
        if not path.is_file():
            return None
        try:
            req = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            logger.warning("ignoring %s: %s", path, exc)
            path.unlink(missing_ok=True)
            return None
        path.unlink(missing_ok=True)
        dp = req.get("dp") or self.layout.dp
        ep = req.get("ep") or self.layout.ep
        allowed = {(lay.dp, lay.ep): lay for lay in self.scaling.layouts()}
        if (dp, ep) not in allowed:
            logger.warning("resize to dp=%s ep=%s refused: allowed are %s", dp, ep, sorted(allowed))
            return None
        return allowed[(dp, ep)]

    def at_step_boundary(self, save: Callable[[], str]) -> dict[str, float]:
        """Grow (or resize on request) between steps; ``save`` writes a checkpoint of now and returns it.

        Returns the new layout's metrics when it changed, else an empty dict."""
        try:
            return self._at_step_boundary(save)
        except GraphError as exc:
            state = self.recover(exc, self.checkpoint_root)
            metrics = {"elastic/dp": self.layout.dp, "elastic/ep": self.layout.ep}
            raise StepRewound(str(exc).splitlines()[0], state, metrics) from exc

    def _at_step_boundary(self, save: Callable[[], str]) -> dict[str, float]:
        requested = self._requested()
        if requested is not None:
            self.wanted = requested
        if self.layout == self.wanted or (requested is None and not self.cfg.elastic.grow):
            return {}
        try:
            target = self._fitting(self.wanted, self.placeable(len(self.graph.actors())))  # colocated: one actor
        except ConfigError:
            return {}
        if target == self.layout:
            return {}
        t0 = time.perf_counter()
        path = save()
        self.graph.shutdown()
        self.graph = self._build(target)
        self.graph.load_checkpoint(path)
        logger.info("actor graph resized from dp=%d ep=%d to dp=%d ep=%d at step %d in %.1f s", self.layout.dp,
                    self.layout.ep, target.dp, target.ep, self.graph.step, time.perf_counter() - t0)  # fmt: skip
        self.events.append({"kind": "resize", "from": [self.layout.dp, self.layout.ep], "to": [target.dp, target.ep],
                            "step": self.graph.step})  # fmt: skip
        self.layout = target
        return {"elastic/dp": target.dp, "elastic/ep": target.ep}
