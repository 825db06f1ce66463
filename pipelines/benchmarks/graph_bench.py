"""``raymoe bench graph``: the training step of the local trainer, the actor graph and Ray Train, side by side.

One run trains the preset (default ``bench``) on the same seeded random token batch of
``train.batch_size × train.seq_len`` tokens with

- the local trainer (:class:`~raymoe.platform.train.trainer.LocalTrainer`, in this process),
- the actor graph (:class:`~raymoe.actors.driver.GraphTrainer`) at each (dp, pp, ep) layout,
  default (1,1,1), (1,1,2), (1,2,2) and (2,1,2), and
- the Ray Train engine (:mod:`raymoe.actors.ray_train`: ``dp`` Ray Train workers, each with the
  whole model and its share of the micro-batches, gradients all-reduced) at each dp of the
  layouts, after the last graph row of that dp (``train dp=2`` after ``graph 2,1,2``),

one after another in one Ray session (started once: ``ray.init(num_cpus=2,
include_dashboard=False)`` unless Ray is already up; shut down at the end if it was started
here). Every row trains the same global batch cut into the same number of micro-batches
(``--micro-batches``, default 2: 2 per replica at dp = 1, 1 per replica at dp = 2), from the
same initial weights, so the first step's loss must agree across rows (the report keeps it as a
check). Each row runs ``warmup_steps`` untimed steps, then ``steps`` timed ones; the graph's
actors are killed before the next row starts. A Ray Train row is one ``TorchTrainer.fit()`` whose
workers run the same warmup and timed steps (rank 0 times them; the workers end with the row).

Reported per row (every number is measured in the run, nothing is estimated):

- **step s**: the median step time over the timed steps (the lower median for an even count, so
  it is a real step and the split below is that step's). Local: the wall time of
  ``LocalTrainer.train_step``. Graph: the driver's wall time of ``GraphTrainer.train_step``
  (``graph/step_s``): submitting every call, waiting for the actors, the optimizer step. Ray Train:
  rank 0's wall time of its step (its share, the all-reduces, the optimizer step).
- **tok/s**: ``batch_size × seq_len`` ÷ step s; **x local**: step s ÷ the local trainer's.
- The split of that step, seen from the busiest actor (the critical path's compute):

  - **compute**: the largest ``compute_s/<actor>`` of the step, i.e. the seconds the busiest
    actor spent inside torch (forward and backward pieces, expert passes, gradient reduction and
    norms, the optimizer step), timed by the actor itself. No schedule can be faster than this
    on its actor. It is wall time: while another process holds the core, it still counts.
    Local: the whole step. (1,1,1): the trainer's own step time inside its actor. Ray Train: a
    worker's step less its all-reduces (which include waiting for the slowest worker). (A stage
    counts its optimizer step into the *next* step's compute, a shard not at all: the first
    AdamW step is slow, so a timed step right after a single warmup step can show more compute
    than step time; the default warmup is 2.)
  - **xfer+wait** = step − compute: the time the busiest actor was *not* computing:
    serializing arguments and results, the object store, Ray's per-call dispatch, the driver's
    submissions and round trips, and waiting for other actors' compute it depends on. (It is
    not split further: the actors time only their own compute.)
  - **Σ compute**: every actor's compute added up. Against the local step it shows how much
    the cut costs in compute (smaller matmuls, threads slowed by other processes on the cores).
  - **Σ CPU**: the CPU seconds (user + system, every thread, read from ``/proc/<pid>/stat``
    before and after the step) of this process (the driver, or the local trainer) and, on graph
    rows, of every actor and of Ray's own processes (raylet, GCS, agents: every other process
    below this one; the object store lives in the raylet). **cores** = Σ CPU ÷ step s (at most
    2 here); **others** = the cores the rest of the machine kept busy meanwhile (other
    programs; on the local row also the idle Ray). Threads that spin while waiting count as busy.

- The driver's view of the same step (graph rows with more than one actor), which partitions
  step s: **submit** (building and submitting every call of the forward and backward, which
  does not wait for results), **wait** (blocked in ``ray.get`` until every actor reported the
  step's forward and backward done), **update** (clipping coefficient, bias update, and the
  round trip of every actor's optimizer step). (1,1,1) is one call: its driver wait is the
  whole step.

Threads: every actor sets its torch threads with :func:`raymoe.actors.stage.set_threads`:
``RAYMOE_ACTOR_THREADS`` when set, else its share of the cores (the cores ÷ the actors of its
kind that compute at once: the colocated actor and a dp = 1 stage take 2 here, each of 2 shards
or of 2 replicas 1). ``--actor-threads N`` sets ``RAYMOE_ACTOR_THREADS`` for every actor through
``ray.init(runtime_env={"env_vars": ...})``, ``--actor-env KEY=VALUE`` any other variable; the
default (``--actor-threads 0``, no variables) leaves the actors' own choice, so the benchmark
measures the graph as ``raymoe pretrain`` runs it. Measured on the 2-core machine (bench preset,
fp32, 1 warmup + 2 timed steps per row; ``x local`` of (1,1,1) / (1,1,2) / (1,2,2) / (2,1,2);
runs differ by up to ~10 %):

- own share (the default):                1.00 / 1.32 / 1.36 / 1.02
- ``RAYMOE_ACTOR_THREADS=2`` (all):       1.04 / 3.26 / 3.81 / 4.15 (oversubscribed: Σ compute
  17 s at (1,1,2) against a 2.3 s local step)
- ``RAYMOE_ACTOR_THREADS=1`` (all):       1.64 / 1.37 / 1.44 / 1.20 (the colocated actor on one core)
- own share + ``OMP_WAIT_POLICY=PASSIVE``: 1.16 / 1.05 / 1.09 / 0.97
- own share + ``GOMP_SPINCOUNT=1000``:    1.04 / 1.18 / 1.15 / 1.16

Where several actors take turns on the cores, torch's OpenMP threads that spin while waiting
for work (libgomp's default) take the cores from the actor that has work: letting them sleep
brings (1,1,2) from 1.32 to 1.05, but slows the lone colocated actor (1.00 → 1.16). Given only
to the actors of multi-actor graphs (the driver's actor options, tried by patching them), it
gave 1.02 / 1.04 / 1.05 / 1.00 (2 warmup + 3 timed steps).
"""

from __future__ import annotations

import gc
import logging
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from raymoe.actors.runtime import Parking
from raymoe.platform.config import ConfigError, RaymoeConfig, load_config

logger = logging.getLogger(__name__)

LOCAL = "local"
GRAPH = "graph"
TRAIN = "train"  # the Ray Train engine
LAYOUTS: tuple[tuple[int, int, int], ...] = ((1, 1, 1), (1, 1, 2), (1, 2, 2), (2, 1, 2))
DTYPES = ("fp32", "bf16")
DEFAULT_ACTOR_THREADS = 0  # RAYMOE_ACTOR_THREADS for every actor; 0 = unset: each actor's share of the cores
RAY_NUM_CPUS = 2
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
DRIVER = "driver"  # this process: the local trainer, or the graph's driver
MACHINE = "machine"  # every process of the machine (CPU seconds not idle)
RAY = "ray"  # Ray's own processes below this one (raylet, GCS, agents, idle workers)
DISTURBED_CORES = 0.25  # other processes busy on this many cores during a row's median step: flagged
SEED = 0
# goals of the issue: the graph's step time over the local trainer's
GOALS = {(1, 1, 1): 1.05, (1, 1, 2): 1.5}


@dataclass(kw_only=True)
class GraphBenchOptions:
    """What ``raymoe bench graph`` runs."""

    preset: str = "bench"
    overrides: list[str] = field(default_factory=list)  # dotted config overrides (train.batch_size=4, ...)
    layouts: tuple[tuple[int, int, int], ...] = LAYOUTS  # (dp, pp, ep) of each graph row
    local: bool = True  # also the local trainer (the reference of the ratios)
    ray_train: bool = True  # also the Ray Train engine at each dp of the layouts
    transports: tuple[str, ...] = ("object_store", "direct")  # parallel.transport of the graph rows (direct: 2+ actors)
    micro_batches: int = 2  # micro-batches of the global batch, on every row (per replica: this ÷ dp)
    warmup_steps: int = 2  # bf16 needs two: oneDNN builds its kernels for the first GEMM shapes it meets
    steps: int = 3  # timed steps per row; a bench-preset step takes ~2.5 s locally on 2 cores
    dtype: str | None = None  # fp32 | bf16; None = the preset's train.dtype
    actor_threads: int = DEFAULT_ACTOR_THREADS  # RAYMOE_ACTOR_THREADS for every actor; 0 = unset
    actor_env: dict[str, str] = field(default_factory=dict)  # more environment variables for the actors


def layout_label(layout: tuple[int, int, int] | None, transport: str = "object_store") -> str:
    if layout is None:
        return LOCAL
    return f"{GRAPH} {','.join(map(str, layout))}" + ("" if transport == "object_store" else f" {transport}")


def train_label(dp: int) -> str:
    return f"{TRAIN} dp={dp}"


def plan_rows(opts: GraphBenchOptions) -> list[tuple[str, Any]]:
    """The rows in order, as (trainer, layout or dp): the local trainer, the graph's layouts, and a Ray Train row
    after the last layout of each dp."""
    rows: list[tuple[str, Any]] = [(LOCAL, None)] if opts.local else []
    for i, layout in enumerate(opts.layouts):
        for transport in opts.transports:
            if transport == "object_store" or layout != (1, 1, 1):  # (1,1,1) is one actor: nothing moves
                rows.append((GRAPH, (layout, transport)))
        if opts.ray_train and layout[0] not in [later[0] for later in opts.layouts[i + 1 :]]:
            rows.append((TRAIN, layout[0]))
    return rows


def parse_layouts(text: str) -> tuple[tuple[int, int, int], ...]:
    """``"1,1,1 1,1,2"`` or ``"1,1,1;1,1,2"`` → ((1,1,1), (1,1,2)); raises :class:`ConfigError`."""
    out = []
    for item in text.replace(";", " ").split():
        parts = item.split(",")
        try:
            values = tuple(int(p) for p in parts)
        except ValueError:
            values = ()
        if len(values) != 3 or min(values) < 1:
            raise ConfigError(f"--layouts: {item!r} is not dp,pp,ep (three positive integers)")
        out.append(values)
    return tuple(out)


def row_config(
    opts: GraphBenchOptions, layout: tuple[int, int, int] | None, transport: str = "object_store"
) -> RaymoeConfig:
    """The config of one row: the preset, the overrides, the dtype and the layout's parallel section."""
    overrides = list(opts.overrides)
    if layout is not None:
        overrides.append(f"parallel.transport={transport}")
    if opts.dtype is not None:
        overrides.append(f"train.dtype={opts.dtype}")
    if layout is not None:
        dp, pp, ep = layout
        if opts.micro_batches % dp:
            raise ConfigError(f"--micro-batches {opts.micro_batches} cannot be split over dp={dp} replicas")
        overrides += [
            f"parallel.dp={dp}",
            f"parallel.pp={pp}",
            f"parallel.ep={ep}",
            f"parallel.micro_batches={opts.micro_batches // dp}",
        ]
    cfg = load_config(opts.preset, overrides)
    if cfg.train.batch_size % opts.micro_batches:
        raise ConfigError(
            f"train.batch_size ({cfg.train.batch_size}) is not divisible by --micro-batches {opts.micro_batches}"
        )
    return cfg


def check_options(opts: GraphBenchOptions) -> RaymoeConfig:
    """Validate ``opts`` (every row's config too); return the local row's config. Raises :class:`ConfigError`."""
    if opts.steps <= 0:
        raise ConfigError(f"--steps must be > 0, got {opts.steps}")
    if opts.warmup_steps < 0:
        raise ConfigError(f"--warmup-steps must be >= 0, got {opts.warmup_steps}")
    if opts.micro_batches <= 0:
        raise ConfigError(f"--micro-batches must be > 0, got {opts.micro_batches}")
    if opts.actor_threads < 0:
        raise ConfigError(f"--actor-threads must be >= 0, got {opts.actor_threads}")
    if opts.dtype is not None and opts.dtype not in DTYPES:
        raise ConfigError(f"--dtype {opts.dtype!r}: choose from {','.join(DTYPES)}")
    if not opts.layouts and not opts.local:
        raise ConfigError("nothing to run: no layouts and no local trainer")
    for layout in opts.layouts:
        row_config(opts, layout)
    return row_config(opts, None)


# --------------------------------------------------------------------------- running


def random_batch(cfg: RaymoeConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The seeded random (input_ids, labels) of one global batch, [batch_size, seq_len] each."""
    gen = torch.Generator().manual_seed(SEED)
    tokens = torch.randint(0, cfg.model.vocab_size, (cfg.train.batch_size, cfg.train.seq_len + 1), generator=gen)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def actor_env(opts: GraphBenchOptions) -> dict[str, str]:
    """The environment variables every actor gets."""
    env = dict(opts.actor_env)
    if opts.actor_threads:
        env["RAYMOE_ACTOR_THREADS"] = str(opts.actor_threads)
    return env


def _start_ray(opts: GraphBenchOptions) -> tuple[bool, bool]:
    """Start Ray unless it is up; returns (started here, the actor environment applied)."""
    import ray

    env = actor_env(opts)
    if ray.is_initialized():
        if env:
            logger.warning("Ray is already running: the actors do not get %s", env)
        return False, not env
    ray.init(
        address="local",  # its own Ray, even where another one runs on this machine
        num_cpus=RAY_NUM_CPUS,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        runtime_env={"env_vars": env} if env else None,
    )
    return True, True


def _process_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system, all threads) of process ``pid`` so far; None where /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()  # after the command name: state is fields[0]
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime
    except (OSError, IndexError, ValueError):
        return None


def _machine_busy_s() -> float | None:
    """CPU seconds every core of the machine spent not idle so far (all processes); None without /proc."""
    try:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        return (sum(values) - values[3] - values[4]) / CLK_TCK
    except (OSError, ValueError):
        return None


def _descendants(root: int) -> set[int]:
    """Every process below ``root`` (children, their children, ...), from /proc; empty without /proc."""
    children: dict[int, list[int]] = {}
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return set()
    for entry in entries:
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rpartition(")")[2].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def _cpu_snapshot(pids: dict[str, int], ray_processes: bool, root: int | None = None) -> dict[str, Any]:
    """CPU seconds so far of each of ``pids``, of the machine, and (``ray_processes``) of every other process
    below ``root`` (default this one): Ray's own (raylet, GCS, agents, idle workers) when Ray was started there."""
    snap: dict[str, Any] = {key: _process_cpu_s(pid) for key, pid in pids.items()}
    snap[MACHINE] = _machine_busy_s()
    if ray_processes:
        others = _descendants(root or os.getpid()) - set(pids.values())
        snap[RAY] = {pid: cpu for pid in others if (cpu := _process_cpu_s(pid)) is not None}
    return snap


def _cpu_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key, value in after.items():
        if key == RAY:  # a process that started during the step counts from its start
            out[key] = sum(cpu - before[RAY].get(pid, 0.0) for pid, cpu in value.items())
        else:
            out[key] = None if value is None or before[key] is None else value - before[key]
    return out


def _time_steps(
    step: Callable[[], Any],
    opts: GraphBenchOptions,
    pids: dict[str, int],
    progress: Callable[[], None] | None,
    ray_processes: bool = False,
    root: int | None = None,
) -> tuple[list[float], list[dict[str, float]], list[float], list[dict[str, float | None]]]:
    """Run the warmup and timed steps; (driver seconds, ``extra`` timings, loss, CPU seconds per process and of the
    machine) of each, warmup included. ``root``: the process below which Ray's own run (default this one)."""
    seconds, extras, losses, cpus = [], [], [], []
    for _ in range(opts.warmup_steps + opts.steps):
        before = _cpu_snapshot(pids, ray_processes, root)
        t0 = time.perf_counter()
        m = step()
        seconds.append(time.perf_counter() - t0)
        cpus.append(_cpu_delta(before, _cpu_snapshot(pids, ray_processes, root)))
        extras.append(dict(m.extra))
        losses.append(float(m.loss))
        if progress is not None:
            progress()
    return seconds, extras, losses, cpus


def _median_index(values: list[float]) -> int:
    """Index of the lower median of ``values``."""
    low = statistics.median_low(values)
    return values.index(low)


def _split(seconds: float, extra: dict[str, float], cpu: dict[str, float | None], trainer: str) -> dict[str, Any]:
    """One step's split: compute of the busiest actor (or worker), the rest, all compute, CPU time, the driver's
    phases (graph rows only)."""
    processes = {k: v for k, v in cpu.items() if k != MACHINE}
    cpu_fields = {
        "cpu_by_process": processes,
        "sum_cpu_s": None if None in processes.values() else sum(processes.values()),
        "machine_cpu_s": cpu[MACHINE],
        "cores_busy": cpu[MACHINE] / seconds if cpu[MACHINE] is not None else None,
        # cores the machine spent on anything but the benchmark's processes (Ray's own, other programs)
        "other_cores": None
        if None in (cpu[MACHINE], *processes.values())
        else max(cpu[MACHINE] - sum(processes.values()), 0.0) / seconds,
    }
    if trainer == LOCAL:
        return {"compute_s": seconds, "busiest": LOCAL, "other_s": 0.0, "sum_compute_s": seconds,
                "submit_s": None, "wait_s": None, "update_s": None, "compute_by_actor": {LOCAL: seconds},
                **cpu_fields}  # fmt: skip
    by_actor = {k.split("/", 1)[1]: v for k, v in extra.items() if k.startswith("compute_s/")}
    busiest = max(by_actor, key=by_actor.get)
    step_s = extra.get("graph/step_s", seconds)
    graph = trainer == GRAPH
    return {
        "compute_s": by_actor[busiest],
        "busiest": busiest,
        "other_s": step_s - by_actor[busiest],
        "sum_compute_s": sum(by_actor.values()),
        "submit_s": extra.get("graph/submit_s"),
        "wait_s": extra.get("graph/wait_s", step_s if graph and len(by_actor) == 1 else None),
        "update_s": extra.get("graph/update_s"),
        "allreduce_s": extra.get("train/allreduce_s"),  # Ray Train: rank 0's reductions (and its waits there)
        "compute_by_actor": by_actor,
        **cpu_fields,
    }


def run_row(
    opts: GraphBenchOptions,
    layout: tuple[int, int, int] | None,
    progress: Callable[[], None] | None = None,
    transport: str = "object_store",
) -> dict[str, Any]:
    """Train one row (``layout`` None: the local trainer); its result (``error`` set on failure)."""
    from raymoe.platform.train.loop import micro_batches

    cfg = row_config(opts, layout, transport)
    input_ids, labels = random_batch(cfg)
    batches = micro_batches(input_ids, labels, opts.micro_batches)
    row: dict[str, Any] = {
        "label": layout_label(layout, transport),
        "trainer": LOCAL if layout is None else GRAPH,
        "transport": None if layout is None else transport,
        "dp": None if layout is None else layout[0],
        "pp": None if layout is None else layout[1],
        "ep": None if layout is None else layout[2],
        "micro_batches_per_replica": opts.micro_batches // (1 if layout is None else layout[0]),
        "dtype": cfg.train.dtype,
        "error": None,
    }
    trainer = None
    t0 = time.perf_counter()
    try:
        torch.manual_seed(cfg.train.seed)
        if layout is None:
            from raymoe.platform.train.trainer import LocalTrainer

            trainer = LocalTrainer(cfg)
            row["actors"] = 0
            pids = {DRIVER: os.getpid()}
        else:
            from raymoe.actors.driver import GraphTrainer

            trainer = GraphTrainer(cfg)
            row["actors"] = len(trainer.actors())
            row["actor_keys"] = trainer.actor_keys()
            pids = {**dict(zip(trainer.actor_keys(), trainer.pids.values())), DRIVER: os.getpid()}
        row["startup_s"] = time.perf_counter() - t0
        seconds, extras, losses, cpus = _time_steps(
            lambda: trainer.train_step(batches), opts, pids, progress, ray_processes=layout is not None
        )
    except Exception as exc:  # noqa: BLE001 - a failed row is reported, the bench goes on
        logger.exception("%s failed", row["label"])
        row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        return row
    finally:
        if trainer is not None and hasattr(trainer, "shutdown"):
            trainer.shutdown()
        trainer = None
        gc.collect()
    return _finish_row(row, opts, cfg, (seconds, extras, losses, cpus))


def _finish_row(row: dict[str, Any], opts: GraphBenchOptions, cfg: RaymoeConfig, timed_steps: tuple) -> dict[str, Any]:
    """``row`` with the median timed step, its split and the losses, from what :func:`_time_steps` returned."""
    seconds, extras, losses, cpus = timed_steps
    timed = seconds[opts.warmup_steps :]
    timed_extra = extras[opts.warmup_steps :]
    step_s = [e.get("graph/step_s", s) for s, e in zip(timed, timed_extra)]
    i = _median_index(step_s)
    tokens = cfg.train.batch_size * cfg.train.seq_len
    row.update(
        {
            "steps_s": step_s,  # each timed step
            "warmup_s": [e.get("graph/step_s", s) for s, e in zip(seconds, extras)][: opts.warmup_steps],
            "step_s": step_s[i],
            "tokens_per_s": tokens / step_s[i],
            "first_loss": losses[0],
            "losses": losses,
            "moved_mb": timed_extra[i].get("graph/moved_mb"),  # tensors the actors handed each other that step
            **_split(step_s[i], timed_extra[i], cpus[opts.warmup_steps + i], row["trainer"]),
        }
    )
    return row


def _train_row_worker(config: dict[str, Any]) -> tuple | None:
    """What every Ray Train worker of a Ray Train row runs: the row's steps on its share; rank 0 times them and
    returns what :func:`_time_steps` returns, with every worker's compute in the ``extra`` timings."""
    import ray.train
    import torch.distributed as dist

    from raymoe.actors.ray_train import ReplicaTrainer
    from raymoe.actors.runtime import set_threads
    from raymoe.platform.devices import resolve_device
    from raymoe.platform.train.loop import micro_batches

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    cfg, opts = config["cfg"], config["opts"]
    set_threads(cfg.parallel.num_cpus_per_actor, peers=context.get_local_world_size())
    torch.manual_seed(cfg.train.seed)
    trainer = ReplicaTrainer(cfg, rank, world, resolve_device(cfg.parallel.device))
    batches = micro_batches(*random_batch(cfg), opts.micro_batches)
    pids: list[Any] = [None] * world
    dist.all_gather_object(pids, os.getpid())
    compute: list[float] = []

    def step() -> Any:
        m = trainer.train_step(batches)
        compute.append(m.extra[f"compute_s/worker_{rank}"])
        return m

    if rank == 0:
        workers = {f"worker_{r}": pid for r, pid in enumerate(pids)}
        timed = _time_steps(step, opts, {**workers, DRIVER: config["driver_pid"]}, None, True, config["driver_pid"])
    else:
        for _ in range(opts.warmup_steps + opts.steps):
            step()
    every: list[Any] = [None] * world
    dist.all_gather_object(every, compute)
    if rank != 0:
        return None
    for i, extra in enumerate(timed[1]):
        extra.update({f"compute_s/worker_{r}": seconds[i] for r, seconds in enumerate(every)})
    return timed


def run_train_row(opts: GraphBenchOptions, dp: int) -> dict[str, Any]:
    """The Ray Train engine's row at ``dp`` workers (a fixed count; ``error`` set on failure)."""
    import dataclasses
    import tempfile

    from ray.train import FailureConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from raymoe.actors.ray_train import backend_of, scaling_config

    cfg = row_config(opts, (dp, 1, 1))
    cfg = dataclasses.replace(cfg, elastic=dataclasses.replace(cfg.elastic, min_dp=dp))
    row: dict[str, Any] = {"label": train_label(dp), "trainer": TRAIN, "dp": dp, "pp": None, "ep": None,
                           "micro_batches_per_replica": opts.micro_batches // dp, "dtype": cfg.train.dtype,
                           "error": None, "actors": dp, "actor_keys": [f"worker_{r}" for r in range(dp)]}  # fmt: skip
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="raymoe-bench-train-") as folder:
            trainer = TorchTrainer(
                _train_row_worker,
                train_loop_config={"cfg": cfg, "opts": opts, "driver_pid": os.getpid()},
                torch_config=TorchConfig(backend=backend_of(cfg)),
                scaling_config=scaling_config(cfg),
                run_config=RunConfig(name=f"bench-{dp}", storage_path=folder, failure_config=FailureConfig()),
            )
            timed = trainer.fit().return_value
    except Exception as exc:  # noqa: BLE001 - a failed row is reported, the bench goes on
        logger.exception("%s failed", row["label"])
        row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        return row
    finally:
        gc.collect()
    row["startup_s"] = time.perf_counter() - t0 - sum(timed[0])  # Ray Train's controller and workers starting
    return _finish_row(row, opts, cfg, timed)


def run(opts: GraphBenchOptions | None = None, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every row of ``opts`` (the local trainer first) in one Ray session; the report dict.

    ``progress(label)`` is called after every step (warmup included) of every row."""
    import ray

    opts = opts or GraphBenchOptions()
    cfg = check_options(opts)
    load_start = os.getloadavg()[0]
    start = time.perf_counter()
    started, env_applied = _start_ray(opts) if opts.layouts else (False, True)
    rows = []
    try:
        for trainer, what in plan_rows(opts):
            if trainer == TRAIN:  # its steps run in the workers: no progress calls
                label = train_label(what)
                rows.append(run_train_row(opts, what))
            else:
                layout, transport = what if what is not None else (None, "object_store")
                label = layout_label(layout, transport)
                rows.append(run_row(opts, layout, (lambda label=label: progress(label)) if progress else None,
                                    transport))  # fmt: skip
            r = rows[-1]
            logger.info("%s: %s", label, r["error"] or f"{r['step_s']:.3f} s/step, {r['tokens_per_s']:,.0f} tok/s")
        hops = hop_latencies(opts, cfg) if opts.layouts and "direct" in opts.transports else []
    finally:
        if started:
            ray.shutdown()
    local = next((r for r in rows if r["trainer"] == LOCAL and not r["error"]), None)
    for r in rows:
        r["x_local"] = r["step_s"] / local["step_s"] if local and not r["error"] else None
        layout = (r["dp"], r["pp"], r["ep"])
        r["goal_x_local"] = GOALS.get(layout) if r["trainer"] == GRAPH else None
        r["goal_met"] = r["x_local"] <= r["goal_x_local"] if r["goal_x_local"] and r["x_local"] else None
    losses = [r["first_loss"] for r in rows if not r["error"]]
    return {
        "benchmark": "graph",
        "preset": opts.preset,
        "overrides": opts.overrides,
        "dtype": cfg.train.dtype,
        "batch_size": cfg.train.batch_size,
        "seq_len": cfg.train.seq_len,
        "tokens_per_step": cfg.train.batch_size * cfg.train.seq_len,
        "micro_batches": opts.micro_batches,
        "warmup_steps": opts.warmup_steps,
        "steps": opts.steps,
        "actor_threads": opts.actor_threads,
        "actor_env": actor_env(opts),
        "actor_env_applied": env_applied,
        "driver_threads": torch.get_num_threads(),
        "ray_num_cpus": RAY_NUM_CPUS if started else None,
        "rows": rows,
        "hops": hops,
        # the same data and initial weights on every row: the first step's losses agree up to rounding
        "first_loss_spread": (max(losses) - min(losses)) if losses else None,
        "seconds": time.perf_counter() - start,
        "load_average": [load_start, os.getloadavg()[0]],
        "versions": {"torch": torch.__version__, "ray": ray.__version__},
    }


class Hop(Parking):
    """A bare actor for the hop latency: makes a tensor, or takes one."""

    def make(self, nbytes: int) -> torch.Tensor:
        return torch.ones(nbytes // 4, dtype=torch.float32)

    def take_in(self, x: torch.Tensor) -> int:
        return x.numel()

    def ready(self) -> bool:
        return True


HOP_REPEATS = 10


def hop_latencies(opts: GraphBenchOptions, cfg: RaymoeConfig) -> list[dict[str, Any]]:
    """For each transport: the median seconds of one actor's tensor reaching another (the made tensor passed on by
    reference, as the driver passes a dispatch buffer), at the size of one micro-batch's rows × hidden in float32."""
    from raymoe.actors.runtime import RayRuntime

    rows = cfg.train.batch_size * cfg.train.seq_len // opts.micro_batches
    nbytes = rows * cfg.model.hidden_size * 4
    out = []
    for transport in opts.transports:
        rt = RayRuntime(60.0, 120.0, where="hop", transport=transport)
        try:
            a, b = (rt.make(Hop, f"Hop({i})", {"num_cpus": 0}) for i in range(2))
            rt.get([rt.call(x, "ready")[0] for x in (a, b)], "starting", long=True)
            rt.connect()
            times = []
            for _ in range(HOP_REPEATS + 1):
                t0 = time.perf_counter()
                rt.get(rt.call(b, "take_in", rt.call(a, "make", nbytes, direct=True)[0]), "a hop")
                times.append(time.perf_counter() - t0)
            timed = sorted(times[1:])
            out.append({"transport": transport, "mb": nbytes / 2**20, "ms": timed[len(timed) // 2] * 1e3,
                        "repeats": HOP_REPEATS})  # fmt: skip
        finally:
            rt.close()
    return out


# --------------------------------------------------------------------------- the table


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_table(report: dict[str, Any]) -> str:
    """The report as aligned columns, with a footnote defining the split."""
    header = ("trainer", "actors", "step s", "x local", "goal", "tok/s", "MB/step", "compute", "busiest", "xfer+wait",
              "Σ compute", "Σ CPU", "cores", "others", "submit", "wait", "update", "loss@0")  # fmt: skip
    rows = []
    for r in report["rows"]:
        if r["error"]:
            rows.append([r["label"], str(r.get("actors", "-")), "failed", *["-"] * (len(header) - 3)])
            continue
        goal = "-"
        if r["goal_x_local"]:
            goal = f"{'ok' if r['goal_met'] else 'MISS'} ≤{r['goal_x_local']:g}"
        rows.append(
            [
                r["label"],
                str(r["actors"]) if r["actors"] else "-",
                f"{r['step_s']:.3f}",
                _cell(r["x_local"], ".2f"),
                goal,
                f"{r['tokens_per_s']:,.0f}",
                _cell(r.get("moved_mb"), ".1f"),
                f"{r['compute_s']:.3f}",
                r["busiest"],
                f"{r['other_s']:.3f}",
                f"{r['sum_compute_s']:.3f}",
                _cell(r["sum_cpu_s"], ".2f"),
                _cell(r["sum_cpu_s"] / r["step_s"] if r["sum_cpu_s"] is not None else None, ".2f"),
                _cell(r["other_cores"], ".2f"),
                _cell(r["submit_s"], ".3f"),
                _cell(r["wait_s"], ".3f"),
                _cell(r["update_s"], ".3f"),
                f"{r['first_loss']:.4f}",
            ]
        )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: tuple[str, ...] | list[str]) -> str:
        return "  ".join(c.ljust(w) if i in (0, 8) else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    threads = f"RAYMOE_ACTOR_THREADS={report['actor_threads']}" if report["actor_threads"] else "own thread counts"
    extra_env = {k: v for k, v in report["actor_env"].items() if k != "RAYMOE_ACTOR_THREADS"}
    if extra_env:
        threads += " " + " ".join(f"{k}={v}" for k, v in extra_env.items())
    if not report["actor_env_applied"]:
        threads += " (NOT applied: Ray was already running)"
    out = [
        f"raymoe bench graph: preset {report['preset']}, {report['dtype']}, {report['batch_size']}x"
        f"{report['seq_len']} tokens in {report['micro_batches']} micro-batches per step "
        f"({report['warmup_steps']} warmup + {report['steps']} timed steps per row); actors: {threads}; "
        f"driver {report['driver_threads']} threads",
        "",
        line(header),
        line(["-" * w for w in widths]),
        *(line(r) for r in rows),
    ]
    failures = [f"  {r['label']}: {r['error']}" for r in report["rows"] if r["error"]]
    if failures:
        out += ["", "failed:", *failures]
    out += [
        "",
        "Seconds of the median timed step (the lower median). x local = step s / the local trainer's; goal = the "
        "issue's bound on x local.",
        "compute = the busiest actor's compute in that step (wall time inside its torch calls, as the actor times "
        "it; the local trainer: the whole step);",
        "  xfer+wait = step s - compute: the busiest actor not computing (serialization, object store, Ray calls, "
        "the driver's round trips,",
        "  waiting on the other actors). Σ compute = every actor's compute added up (wall times: a process "
        "sharing a core counts its waits).",
        "Σ CPU = CPU seconds (user + system, from /proc) in the step of this process, the actors and Ray's own "
        "processes; cores = Σ CPU / step s;",
        "  others = the cores the rest of the machine kept busy meanwhile (other programs: above ~0.25 the row "
        "was disturbed).",
        "submit + wait + update = step s as the driver sees it: submitting every call, blocked until every actor "
        "finished forward and backward,",
        "  the optimizer step's round trip; (1,1,1) is one call (all wait). loss@0 = the first step's loss: the "
        "same data and initial weights",
        f"  on every row (spread {_cell(report['first_loss_spread'], '.2e')}).",
        "MB/step = the tensors the graph's actors handed each other in that step (dispatch buffers, expert outputs, "
        "hidden rows, gradients); 'direct' rows: parallel.transport=direct (Ray Direct Transport over gloo).",
        "train dp=N = the Ray Train engine: N workers, each with the whole model and its share of the micro-batches; "
        "its compute = a worker's step less its all-reduces.",
        *[
            f"one hop of {h['mb']:.1f} MB (a micro-batch's rows) from one actor to another, with the driver's round "
            f"trip: {h['transport']} {h['ms']:.1f} ms (median of {h['repeats']})"
            for h in report.get("hops", [])
        ],
        f"took {report['seconds']:.0f} s; 1-min load average {report['load_average'][0]:.2f} before the bench",
    ]
    disturbed = [f"{r['label']} ({r['other_cores']:.2f})" for r in report["rows"]
                 if not r["error"] and (r.get("other_cores") or 0.0) > DISTURBED_CORES]  # fmt: skip
    if disturbed:
        out.append(
            f"WARNING: other processes kept cores busy during {', '.join(disturbed)}: those timings are slower than "
            "on a quiet machine; rerun"
        )
    measured = any(r.get("other_cores") is not None for r in report["rows"] if not r["error"])
    if not measured and report["load_average"][0] > 1.0:  # without /proc: the load average is all there is
        out.append(
            f"WARNING: the machine was busy when the bench started (load average {report['load_average'][0]:.2f}); "
            "rerun on a quiet machine"
        )
    return "\n".join(out)
