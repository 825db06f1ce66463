"""The actor graph's runtime: making actors, calling them, waiting with a timeout, naming the dead, closing.

Every driver (training's :class:`~raymoe.actors.driver.GraphTrainer`, serving's
:class:`~raymoe.actors.graph.GraphRunner`) makes and calls its actors through a :class:`Runtime`:
:class:`RayRuntime` (Ray actors; calls return object references at once) or
:class:`InProcessRuntime` (plain objects in this process, the same schedule: tests of the math,
debugging). Every wait is bounded; a dead, hung or failing actor is a :class:`GraphError` that
names it by its label (``Stage(replica 0, stage 1)``, ``Shard(2)``). Closing kills every actor
and waits (briefly) until Ray reports it gone.

Transports (``parallel.transport``): with ``object_store`` a call's results are Ray objects
(serialized into the object store, read from there by the actor that takes them). With
``direct``, the data-plane calls (``call(..., direct=True)``: activations, dispatch buffers,
gradients) run through :meth:`Parking.park` and their results are handed out one by one by
:meth:`Parking.take` with Ray Direct Transport: the tensors go from actor to actor over a gloo
collective group of the graph's actors (torch.distributed's), the driver still passing only
references. The driver's own reads (reports, losses) stay in the object store.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from typing import Any

import torch

logger = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 5.0  # how long a probe of a possibly dead actor may take


class GraphError(RuntimeError):
    """The actor graph cannot go on: an actor died, timed out or failed; the message names it."""


def tensor_bytes(value: Any) -> int:
    """The bytes of every tensor in ``value`` (tensors, dataclasses, lists, tuples, dicts of them)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if hasattr(value, "__dataclass_fields__"):
        return sum(tensor_bytes(getattr(value, f)) for f in value.__dataclass_fields__)
    return 0


class Parking:
    """What a graph actor needs for the direct transport: run a call and keep its results, hand them out one by one.

    Ray Direct Transport allows one return value a call, and a stage call has one per expert shard
    and one for the next stage; so :meth:`park` runs the call and keeps its ``n`` results under a
    tag of the driver's, and :meth:`take` (called with ``tensor_transport``) returns result ``i``.
    An actor runs its calls in order, so a take always finds what the park before it left."""

    def relay(self, method: str, *args: Any) -> Any:
        """A data-plane call by the object store: the call itself, its tensor bytes counted (:meth:`sent_bytes`)."""
        out = getattr(self, method)(*args)
        self._sent = self.__dict__.get("_sent", 0) + tensor_bytes(out)
        return out

    def park(self, tag: int, method: str, n: int, *args: Any) -> None:
        parked = self.__dict__.setdefault("_parked", {})
        try:
            out = getattr(self, method)(*args)
        except BaseException as exc:  # every take of this call re-raises it (the driver reads only the takes)
            parked[tag] = [exc, n]
            raise
        self._sent = self.__dict__.get("_sent", 0) + tensor_bytes(out)
        parked[tag] = [[out] if n == 1 else list(out), n]

    def sent_bytes(self) -> int:
        """The tensor bytes of this actor's data-plane results since the last call (and resets the count)."""
        return self.__dict__.pop("_sent", 0)

    def take(self, tag: int, i: int) -> Any:
        entry = self._parked[tag]
        entry[1] -= 1
        if entry[1] == 0:
            del self._parked[tag]
        if isinstance(entry[0], BaseException):
            raise entry[0]
        return entry[0][i]


def set_threads(num_cpus: float = 0.0, peers: int = 1) -> int:
    """Torch threads of an actor: ``RAYMOE_ACTOR_THREADS``, else its CPU reservation, else its share of the cores.

    Ray sets OMP_NUM_THREADS=1 in an actor that reserves no CPU (the default here), which runs
    a colocated graph's matrix products on one core (measured on 2 cores: the whole model at
    half the local trainer's speed). Giving every actor all cores is worse where actors compute
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


def ensure_ray() -> None:
    """Join the cluster at ``RAY_ADDRESS`` when set (as ``ray job submit`` does), else start a local Ray in-process."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(address="local", include_dashboard=False, log_to_driver=True, configure_logging=False)


def this_node() -> dict[str, str]:
    """The Ray node this process runs on (``node_id``, ``node_ip``); empty outside Ray."""
    try:
        import ray

        if not ray.is_initialized():
            return {}
        return {"node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address()}
    except Exception:  # noqa: BLE001 - outside a Ray worker
        return {}


def first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


class Runtime:
    """Actors made, called and awaited the same way whether they are Ray actors or plain objects.

    Args:
        timeout_s: the longest wait for one step's results.
        long_timeout_s: the longest wait for starting actors, checkpoints and evaluation.
        where: what the errors say the graph was doing (``step 12``, ``inference``); may be changed.
    """

    in_process = False

    def __init__(self, timeout_s: float, long_timeout_s: float, where: str = "") -> None:
        self.timeout_s, self.long_timeout_s = timeout_s, long_timeout_s
        self.where = where
        self.actors: list[Any] = []
        self.labels: list[str] = []
        self.nodes: dict[str, dict[str, str]] = {}  # label -> the node the actor runs on (from its ready())

    def record(self, infos: list[dict]) -> None:
        """Keep what each actor's ``ready()`` said of its node (in the order of the actors)."""
        for label, info in zip(self.labels, infos):
            if info.get("node_id"):
                self.nodes[label] = {"node_id": info["node_id"], "node_ip": info.get("node_ip", "")}

    def make(self, cls: type, label: str, options: dict, *args: Any) -> Any:
        raise NotImplementedError

    def reserve(self, bundles: list[dict[str, float]], strategy: str, timeout_s: float) -> None:
        """Reserve one bundle per actor to come, all or nothing (Ray: a placement group); nothing in process."""

    def call(self, actor: Any, method: str, *args: Any, n: int = 1, direct: bool = False) -> list:
        """Call ``actor.method(*args)``; its ``n`` results (Ray: object references, at once).

        ``direct``: a data-plane call, whose results go actor to actor by the direct transport when on."""
        raise NotImplementedError

    def connect(self) -> None:
        """Join the actors made so far into the direct transport's collective group (when it is on)."""

    def put(self, value: Any) -> Any:
        return value

    def get(self, refs: list, what: str, long: bool = False) -> list:
        """The values of ``refs`` within the timeout; a GraphError naming the actor at fault otherwise."""
        return refs

    def settle(self, refs: list) -> None:
        """Wait (bounded) until ``refs`` finished, whatever their outcome (before cleaning up after a failure)."""

    def close(self) -> None:
        self.actors, self.labels = [], []


class InProcessRuntime(Runtime):
    """The schedule on plain objects in this process: calls run at once and return their values."""

    in_process = True

    def make(self, cls: type, label: str, options: dict, *args: Any) -> Any:
        actor = cls(*args)
        self.actors.append(actor)
        self.labels.append(label)
        return actor

    def call(self, actor: Any, method: str, *args: Any, n: int = 1, direct: bool = False) -> list:
        out = getattr(actor, method)(*args)
        return [out] if n == 1 else list(out)  # as Ray's num_returns splits them


class RayRuntime(Runtime):
    """Ray actors: calls return object references at once; the driver passes them on and waits only in :meth:`get`."""

    def __init__(self, timeout_s: float, long_timeout_s: float, where: str = "", transport: str = "object_store"):
        super().__init__(timeout_s, long_timeout_s, where)
        ensure_ray()
        self.group: Any = None  # the placement group of the actors, when reserved
        self.direct = transport == "direct"
        self.collective: Any = None  # the direct transport's collective group, once connected
        self.tags = 0

    def reserve(self, bundles: list[dict[str, float]], strategy: str, timeout_s: float) -> None:
        """One placement group, a bundle per actor, all or nothing; GraphError naming what is missing on timeout.

        Actors made afterwards go into the bundles in order (the n-th actor into bundle n)."""
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group

        strategy = resolve_placement(strategy, bundles)
        group = placement_group(bundles, strategy=strategy)
        if not group.wait(timeout_s):
            remove_placement_group(group)
            need: dict[str, float] = {}
            for b in bundles:
                for k, v in b.items():
                    need[k] = need.get(k, 0.0) + v
            free = ray.available_resources()
            short = {k: f"{v:g} needed, {free.get(k, 0.0):g} free" for k, v in need.items() if free.get(k, 0.0) < v}
            raise GraphError(
                f"{self.where + ': ' if self.where else ''}cannot place {len(bundles)} actors ({strategy}) within "
                f"{timeout_s:g} s: each needs {_resources(bundles[0])}; "
                + (f"missing {short}" if short else f"no node fits them as {strategy} asks (free: {_resources(free)})")
            )
        self.group = group

    def make(self, cls: type, label: str, options: dict, *args: Any) -> Any:
        import ray

        if self.group is not None:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            strategy = PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=len(self.actors))
            options = {**options, "scheduling_strategy": strategy}
        remote = ray.remote(enable_tensor_transport=True)(cls) if self.direct else ray.remote(cls)
        actor = remote.options(**options).remote(*args)
        self.actors.append(actor)
        self.labels.append(label)
        return actor

    def call(self, actor: Any, method: str, *args: Any, n: int = 1, direct: bool = False) -> list:
        if direct and self.collective is not None:
            self.tags += 1
            actor.park.remote(self.tags, method, n, *args)
            return [actor.take.options(tensor_transport=GLOO).remote(self.tags, i) for i in range(n)]
        if direct:  # the same call, its bytes counted by the actor
            refs = actor.relay.options(num_returns=n).remote(method, *args)
        else:
            refs = getattr(actor, method).options(num_returns=n).remote(*args)
        return [refs] if n == 1 else list(refs)

    def connect(self) -> None:
        """One gloo collective group of every actor (ranks in the order they were made), for the direct transport.

        It initializes torch.distributed in each actor with that world; the replicas' gradient
        all-reduce then runs in a subgroup of it (:meth:`~raymoe.actors.stage.Collective.join`)."""
        if not self.direct or len(self.actors) < 2:
            return
        import uuid

        from ray.experimental.collective import create_collective_group

        try:
            self.collective = create_collective_group(self.actors, backend="torch_gloo", name=f"raymoe-{uuid.uuid4()}")
        except Exception as exc:  # noqa: BLE001 - Ray's own errors: name the step
            raise GraphError(f"{self.where + ': ' if self.where else ''}the direct transport's collective group "
                             f"could not be made: {first_line(exc)}") from exc  # fmt: skip

    def put(self, value: Any) -> Any:
        import ray

        return ray.put(value)

    def get(self, refs: list, what: str, long: bool = False) -> list:
        import ray

        timeout = self.long_timeout_s if long else self.timeout_s
        where = f"{self.where}: " if self.where else ""
        try:
            return ray.get(refs, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            name = "long_timeout_s" if long else "timeout_s"
            dead = self.dead_actors()
            lost = self.lost_nodes(dead) if dead else []
            gone = f"; lost node{'s' if len(lost) > 1 else ''} {', '.join(lost)}" if lost else ""
            who = f" ({', '.join(dead)} no longer answer{gone})" if dead else ""
            raise GraphError(f"{where}{what} took longer than parallel.{name}={timeout:g} s{who}") from None
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
            cause = getattr(exc, "cause", None) or exc
            dead = self.dead_actors()
            if dead:  # an error can surface on a live actor whose input came from the dead one: name the dead
                lost = self.lost_nodes(dead)
                gone = f" (lost node{'s' if len(lost) > 1 else ''} {', '.join(lost)})" if lost else ""
                raise GraphError(f"{where}{', '.join(dead)} died while {what}{gone}: {first_line(exc)}") from exc
            who = self._who(exc)
            raise GraphError(f"{where}{who} failed while {what}: {type(cause).__name__}: {cause}") from exc

    def _who(self, exc: BaseException) -> str:
        text = str(exc)
        for actor, label in zip(self.actors, self.labels):
            actor_id = getattr(actor, "_actor_id", None)
            if actor_id is not None and actor_id.hex() in text:
                return label
        m = re.search(r"class_name: (\w+)", text)
        return f"an actor ({m.group(1)})" if m else "an actor"

    def dead_actors(self, timeout_s: float = PROBE_TIMEOUT_S) -> list[str]:
        """Labels of the actors that no longer answer (every actor is asked at once)."""
        import ray

        refs = []
        for actor in self.actors:
            try:
                refs.append(actor.ready.remote())
            except Exception:  # noqa: BLE001 - an actor handle that cannot even submit is dead
                refs.append(None)
        dead = []
        for label, ref in zip(self.labels, refs):
            if ref is None:
                dead.append(label)
                continue
            try:
                ray.get(ref, timeout=timeout_s)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                dead.append(label)
            except ray.exceptions.RayError:
                dead.append(label)
        return dead

    def lost_nodes(self, labels: list[str]) -> list[str]:
        """The nodes of ``labels``' actors that are gone, as ``ip (node id…)``.

        Gone: Ray no longer counts the node alive, or its raylet no longer accepts a connection
        (the actors of a lost node die before Ray's health checks declare the node dead)."""
        import ray

        nodes = {n["NodeID"]: n for n in ray.nodes()}
        lost = {}
        for label in labels:
            node = self.nodes.get(label)
            if node is None:
                continue
            info = nodes.get(node["node_id"])
            if info is None or not info.get("Alive") or not _reachable(info):
                lost[node["node_id"]] = f"{node['node_ip']} (node {node['node_id'][:12]})"
        return sorted(lost.values())

    def settle(self, refs: list) -> None:
        import ray

        ray.wait(refs, num_returns=len(refs), timeout=self.timeout_s)

    def close(self) -> None:
        """Kill every actor and wait (briefly) until Ray reports them gone (idempotent)."""
        import ray

        actors = list(self.actors)
        self.collective = None  # goes with its actors (each one's torch.distributed dies with its process)
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
        if self.group is not None:
            from ray.util.placement_group import remove_placement_group

            try:
                remove_placement_group(self.group)
            except Exception:  # noqa: BLE001 - already gone with its node
                pass
            self.group = None
        super().close()


def _reachable(node: dict) -> bool:
    """Whether the node's raylet accepts a TCP connection (unknown address: assumed reachable)."""
    address, port = node.get("NodeManagerAddress"), node.get("NodeManagerPort")
    if not address or not port:
        return True
    try:
        with socket.create_connection((address, int(port)), timeout=1.0):
            return True
    except OSError:
        return False


def _resources(r: dict[str, float]) -> str:
    shown = {k: v for k, v in r.items() if k in ("CPU", "GPU", "memory") or not k.startswith(("node:", "object_store"))}
    return ", ".join(f"{k} {v / 2**30:.1f} GiB" if k == "memory" else f"{k} {v:g}" for k, v in sorted(shown.items()))


MIN_BUNDLE_CPU = 0.01  # a bundle must reserve something: an actor that asks for no CPU takes this sliver


def resolve_placement(strategy: str, bundles: list[dict[str, float]]) -> str:
    """``auto``: SPREAD when every bundle is the bare sliver (actors that reserve nothing) and Ray has several alive
    nodes, so that such actors do not all land on the first node; otherwise PACK (reserved resources fill a node,
    e.g. its GPUs, before the next). PACK and SPREAD are kept."""
    if strategy != "auto":
        return strategy
    import ray

    bare = all(set(b) == {"CPU"} and b["CPU"] <= MIN_BUNDLE_CPU for b in bundles)
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    return "SPREAD" if bare and nodes > 1 else "PACK"


def actor_bundle(num_cpus: float, num_gpus: float, memory_gb: float = 0.0) -> dict[str, float]:
    """The placement-group bundle of one actor of the graph."""
    bundle = {"CPU": max(num_cpus, MIN_BUNDLE_CPU)}
    if num_gpus > 0:
        bundle["GPU"] = num_gpus
    if memory_gb > 0:
        bundle["memory"] = memory_gb * 2**30
    return bundle


GLOO = "gloo"  # the direct transport's tensor transport (the collective group is torch.distributed's gloo)


def make_runtime(
    in_process: bool, timeout_s: float, long_timeout_s: float, where: str = "", transport: str = "object_store"
) -> Runtime:
    if in_process:
        return InProcessRuntime(timeout_s, long_timeout_s, where)
    return RayRuntime(timeout_s, long_timeout_s, where, transport)
