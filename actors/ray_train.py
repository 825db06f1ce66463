"""The Ray Train engine (``raymoe pretrain --trainer train``): data parallelism on Ray Train v2, for a model that
fits one device.

A :class:`ray.train.torch.TorchTrainer` starts ``parallel.dp`` workers; Ray Train sets up
torch.distributed among them (gloo on the CPU, NCCL when the workers reserve GPUs). Every worker runs
the one training loop (:func:`~raymoe.platform.train.loop.pretrain`) with a :class:`ReplicaTrainer`,
so every worker reads the same global batches in the same order; a step runs only the worker's share
of the global batch's micro-batches (strided by rank: the union over the workers is exactly the global
batch), then sums over the workers, by hand with ``torch.distributed.all_reduce`` (not DDP, so the model
code stays single-device and the CPU and GPU paths are one): the gradients (each micro-batch's loss is
scaled by 1 / all micro-batches, so the sum is the local trainer's mean), the expert loads before the
bias update (every worker applies the same update) and the loss metrics. Losses and parameters equal
the local trainer's at the same global batch (up to the order of float additions).

Rank 0 alone logs to MLflow and writes checkpoints, in the project's one training layout under the
run's checkpoint root (``train.checkpoint_uri`` or the output); every worker then calls
``ray.train.report`` with, from rank 0, a small *pointer* checkpoint naming it, which Ray Train keeps in
its run folder (``ROOT/ray_train/<run>/``, ``RunConfig(storage_path=ROOT/ray_train)``). When a worker
dies, Ray Train's ``FailureConfig`` restarts the workers, and they resume from what
:func:`restore_point` picks (rank 0 picks, every worker loads it): our latest checkpoint under the root
when this run wrote it (its ``trainer_state.json`` names the Ray Train run), else the one that
``ray.train.get_checkpoint()`` points to. Ray Train's alone is not enough: it lags ours by one when a
worker dies before the controller took in the last report (seen: a worker killed one step after a
checkpoint restarted from step 0). Ours alone is not right either: the root may hold a later checkpoint
of an earlier run into the same output. The data loader resumes at the checkpoint's exact sample, so
every sample counts once; only the steps since that checkpoint are done again.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import re
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from raymoe.platform import storage
from raymoe.platform.checkpoint.layout import CHECKPOINTS_DIR, STATE_FILE, latest_checkpoint, step_dir_name
from raymoe.platform.config import ConfigError, RaymoeConfig
from raymoe.platform.devices import resolve_device
from raymoe.platform.model import DeepseekV3
from raymoe.platform.train.balance import LoadCounter, max_violation
from raymoe.platform.train.loop import PretrainResult, pretrain
from raymoe.platform.train.trainer import STEP_SUMS, LocalTrainer, StepMetrics, autocast_context, build_model

logger = logging.getLogger(__name__)

RAY_TRAIN_DIR = "ray_train"  # ROOT/ray_train/<run>/: Ray Train's own run folder (its snapshot, the pointers)
POINTER_FILE = "raymoe_checkpoint.json"  # in a Ray Train checkpoint: {"checkpoint": our checkpoint, "step": N}
ATTEMPTS_FILE = "raymoe_attempts.json"  # in the Ray Train run folder: how many times the workers started
GRAD_BUCKET_NUMEL = 1 << 24  # gradients all-reduced 16 Mi elements (64 MiB in fp32) at a time: bounded extra memory
MIN_WORKER_CPU = 0.01  # a worker that asks for no CPU (parallel.num_cpus_per_actor=0) reserves this sliver


class RayTrainError(RuntimeError):
    """The Ray Train run failed (a worker's error past ``elastic.max_failures``); the message names the ranks."""


def check_engine(cfg: RaymoeConfig) -> None:
    """ConfigError when ``cfg`` asks for what the data-parallel engine cannot do."""
    p = cfg.parallel
    if p.pp != 1 or p.ep != 1:
        raise ConfigError(
            f"--trainer train is data-parallel only (parallel.dp workers, each holding the whole model): "
            f"parallel.pp and parallel.ep must be 1, got {p.pp} and {p.ep}; use --trainer graph to cut the model"
        )
    if p.device.startswith("cuda") and p.num_gpus_per_actor <= 0:
        raise ConfigError(
            f"parallel.device={p.device} with --trainer train needs GPUs reserved for the workers: "
            f"set parallel.num_gpus_per_actor (e.g. 1)"
        )


def backend_of(cfg: RaymoeConfig) -> str:
    """The torch.distributed backend of the workers: NCCL when they reserve GPUs and compute on them, else gloo."""
    p = cfg.parallel
    return "nccl" if p.num_gpus_per_actor > 0 and p.device != "cpu" else "gloo"


def scaling_config(cfg: RaymoeConfig) -> Any:
    """Ray Train's ScalingConfig: ``parallel.dp`` workers, or elastic ``(elastic.min_dp, parallel.dp)``.

    Ray 2.60 takes a ``(min, max)`` tuple for ``num_workers``; it is used when ``elastic.enabled`` and
    ``elastic.min_dp < parallel.dp``. Each worker reserves ``parallel.num_cpus_per_actor`` CPUs (at
    least :data:`MIN_WORKER_CPU`) and ``parallel.num_gpus_per_actor`` GPUs."""
    from ray.train import ScalingConfig

    p, e = cfg.parallel, cfg.elastic
    elastic = e.enabled and e.min_dp < p.dp
    resources = {"CPU": max(p.num_cpus_per_actor, MIN_WORKER_CPU)}
    if p.num_gpus_per_actor > 0:
        resources["GPU"] = p.num_gpus_per_actor
    return ScalingConfig(
        num_workers=(e.min_dp, p.dp) if elastic else p.dp,
        use_gpu=p.num_gpus_per_actor > 0,
        resources_per_worker=resources,
    )


def failure_config(cfg: RaymoeConfig) -> Any:
    """Ray Train's FailureConfig: ``elastic.max_failures`` worker-group restarts (none with ``elastic.enabled=false``).

    Ray Train counts failures over the whole run (``elastic.window_s`` does not apply), restarts at
    once (no ``elastic.backoff_s``), and gives up starting the workers after as many failed starts
    (each bounded by Ray Train's ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S``), not forever."""
    from ray.train import FailureConfig

    retries = cfg.elastic.max_failures if cfg.elastic.enabled else 0
    return FailureConfig(max_failures=retries, controller_failure_limit=retries)


# --------------------------------------------------------------------------- one worker


class ReplicaTrainer(LocalTrainer):
    """The local trainer as one of ``world_size`` data-parallel workers (torch.distributed set up by Ray Train).

    Args:
        cfg: the run's config.
        rank, world_size: this worker and how many there are.
        device: where this worker computes.
        run: the Ray Train run's name; a checkpoint of this run carries it, with the losses so far.
        restore_from: the checkpoint to resume from when the loop asks for one (Ray Train's, after a restart).
        model: an existing model (default: :func:`~raymoe.platform.train.trainer.build_model` on ``device``).
    """

    kind = "train"

    def __init__(
        self,
        cfg: RaymoeConfig,
        rank: int,
        world_size: int,
        device: torch.device | str = "cpu",
        run: str = "",
        restore_from: str | None = None,
        model: DeepseekV3 | None = None,
    ) -> None:
        super().__init__(cfg, model if model is not None else build_model(cfg, device))
        self.rank, self.world_size = rank, world_size
        self.run, self.restore_from = run, restore_from
        self.history: dict[int, float] = {}  # step -> loss, over every attempt of this run
        self.failures = 0  # the workers' restarts before this attempt (set by the worker loop)
        self.attempt = 1

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"train.backend": self._backend()}

    def _backend(self) -> str:
        dist = torch.distributed
        return str(dist.get_backend()) if dist.is_available() and dist.is_initialized() else "none"

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the workers, in place (nothing to do with one worker)."""
        if self.world_size > 1:
            torch.distributed.all_reduce(t)
        return t

    def _share(self, items: list) -> list:
        return items[self.rank :: self.world_size]

    def _mine(self, micro_batches: list) -> list:
        return self._share(micro_batches)

    def _reduce(self, sums: dict[str, float], loads: torch.Tensor) -> tuple[dict[str, float], torch.Tensor]:
        """Gradients, then the metric sums and the loads in one all-reduce (float64: exact counts, the local
        trainer's float sums), so every worker takes the same step as the local trainer on all micro-batches."""
        t_comm = time.perf_counter()
        self._reduce_gradients()
        flat = torch.tensor([sums[k] for k in STEP_SUMS], dtype=torch.float64)
        reduced = self._all_reduce(torch.cat([flat, loads.double().reshape(-1)]).to(self.device)).cpu()
        self._comm_s = time.perf_counter() - t_comm
        total = dict(zip(STEP_SUMS, reduced[: len(STEP_SUMS)].tolist()))
        return total, reduced[len(STEP_SUMS) :].reshape(loads.shape).float()

    def train_step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> StepMetrics:
        """One optimizer step over the global batch's ``micro_batches``, of which this worker runs ``[rank::world]``
        (:meth:`LocalTrainer.train_step` with :meth:`_mine` and :meth:`_reduce`), with the worker's timings."""
        metrics = super().train_step(micro_batches)
        metrics.extra = {
            f"compute_s/worker_{self.rank}": metrics.seconds - self._comm_s,
            "train/allreduce_s": self._comm_s,  # the reductions, and waiting there for the slowest worker
            "train/workers": self.world_size,
            "train/attempt": self.attempt,
        }
        self.history[metrics.step] = metrics.loss
        return metrics

    def _reduce_gradients(self) -> None:
        """Sum every parameter's gradient over the workers, bucket by bucket.

        A parameter that no worker's share touched keeps no gradient (as in the local trainer, AdamW
        skips it); one that only some touched gets the sum, zeros standing in for the others."""
        if self.world_size == 1:
            return
        params = [p for p in self.model.parameters() if p.requires_grad]
        touched = self._all_reduce(torch.tensor([p.grad is not None for p in params], dtype=torch.float32,
                                                device=self.device)).tolist()  # fmt: skip
        bucket: list[torch.nn.Parameter] = []
        size = 0
        for p, hit in zip(params, touched):
            if not hit:
                p.grad = None
                continue
            bucket.append(p)
            size += p.numel()
            if size >= GRAD_BUCKET_NUMEL:
                self._reduce_bucket(bucket)
                bucket, size = [], 0
        if bucket:
            self._reduce_bucket(bucket)

    def _reduce_bucket(self, bucket: list[torch.nn.Parameter]) -> None:
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in bucket])
        self._all_reduce(flat)
        offset = 0
        for p in bucket:
            p.grad = flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()

    @torch.no_grad()
    def evaluate(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, torch.Tensor]:
        """The local trainer's validation over all ``batches``, each worker running ``batches[rank::world]``."""
        was_training = self.model.training
        self.model.eval()
        main_layers = [layer for layer in self.moe_layer_ids if layer < self.cfg.model.num_hidden_layers]
        counter = LoadCounter(main_layers, self.cfg.model.n_routed_experts)
        total, count = 0.0, 0
        for input_ids, labels in self._share(batches):
            with autocast_context(self.cfg.train.dtype, self.device):
                out = self.model.loss(input_ids.to(self.device), labels.to(self.device), mtp_lambda=0.0, hooks=counter)
            total += out.main_loss.item() * out.tokens
            count += out.tokens
        self.model.train(was_training)
        loads = counter.loads()
        flat = torch.cat([torch.tensor([total, count], dtype=torch.float64), loads.double().reshape(-1)])
        reduced = self._all_reduce(flat.to(self.device)).cpu()
        loads = reduced[2:].reshape(loads.shape).float()
        return float(reduced[0]) / max(float(reduced[1]), 1.0), max_violation(loads) if loads.numel() else torch.zeros(
            0
        )

    # -- checkpoints ------------------------------------------------------------------------

    def save_checkpoint(self, root: str, state: dict[str, Any], extra_files: list | None = None) -> str:
        """Rank 0 writes the checkpoint of now under ``root`` (the training layout); every worker reports it to
        Ray Train. Returns its location on every worker."""
        state = {**state, "ray_train": {"run": self.run, "losses": {str(s): v for s, v in self.history.items()}}}
        if self.rank == 0:
            path = super().save_checkpoint(root, state, extra_files)
        else:
            path = storage.join(str(root), CHECKPOINTS_DIR, step_dir_name(self.step))
        self._report(path)
        return path

    def _report(self, path: str) -> None:
        """``ray.train.report`` of the checkpoint at ``path``: rank 0 sends a pointer to it, the others nothing."""
        import ray.train

        metrics = {"step": self.step, "loss": self.history.get(self.step - 1, float("nan"))}
        if self.rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as folder:
            Path(folder, POINTER_FILE).write_text(json.dumps({"checkpoint": path, "step": self.step}))
            name = f"{step_dir_name(self.step)}-attempt_{self.attempt:02d}"  # a step done again is a new one
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder), checkpoint_dir_name=name)

    def load_checkpoint(self, path: str) -> dict[str, Any]:
        """Restore from ``restore_from`` when set (Ray Train's checkpoint of this run), else from ``path``.

        The losses the checkpoint carries come back when it is of this run (``run``)."""
        chosen = self.restore_from or path
        if chosen != path:
            logger.info("resuming from Ray Train's checkpoint %s (not the latest under the root, %s)", chosen, path)
        state = super().load_checkpoint(chosen)
        mine = state.get("ray_train", {})
        if mine.get("run") == self.run:
            self.history = {int(s): v for s, v in mine.get("losses", {}).items() if int(s) < self.step}
        return state


# --------------------------------------------------------------------------- what every worker runs


def _worker_device(cfg: RaymoeConfig) -> torch.device:
    """``parallel.device`` in this worker; on CUDA the GPU Ray Train gave it."""
    device = resolve_device(cfg.parallel.device)
    if device.type == "cuda":
        import ray.train.torch

        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)
    return device


def _reported_checkpoint() -> str | None:
    """Our checkpoint that Ray Train's latest checkpoint of this run points to, or None."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        return json.loads(Path(folder, POINTER_FILE).read_text())["checkpoint"]


def restore_point(root: str, run: str) -> str | None:
    """The checkpoint a (re)started worker group of the Ray Train run ``run`` resumes from, or None.

    Our latest checkpoint under ``root`` when this run wrote it (its state names ``run``): Ray Train's
    own can lag it by one, when a worker died before the controller took in the last report. Else
    Ray Train's (``ray.train.get_checkpoint``): the latest under the root is then another run's (an
    earlier run into the same output), which this one must not resume."""
    latest = latest_checkpoint(root)
    if latest is not None:
        state = storage.read_json(storage.join(latest, STATE_FILE))
        if state.get("ray_train", {}).get("run") == run:
            return latest
    return _reported_checkpoint()


def _count_attempt(run_dir: str) -> int:
    """This start of the workers' number (1, then 2 after a restart, ...), kept in the Ray Train run folder."""
    location = storage.join(run_dir, ATTEMPTS_FILE)
    try:
        attempt = int(storage.read_json(location)["attempts"]) + 1
    except FileNotFoundError:
        attempt = 1
    storage.write_json(location, {"attempts": attempt})
    return attempt


def _worker_loop(config: dict[str, Any]) -> PretrainResult | None:
    """The training function of every Ray Train worker: the training loop on its share; rank 0 returns the result."""
    import ray.train

    from raymoe.actors.runtime import set_threads

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    cfg: RaymoeConfig = config["cfg"]
    if rank == 0:
        logging.basicConfig(level=config["log_level"], format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("raymoe").setLevel(config["log_level"])
    else:  # one worker logs, tracks and records; the others compute the same steps
        logging.getLogger("raymoe").setLevel(max(config["log_level"], logging.WARNING))
        cfg = dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, enabled=False),
                                  data=dataclasses.replace(cfg.data, record_samples=False))  # fmt: skip
    set_threads(cfg.parallel.num_cpus_per_actor, peers=context.get_local_world_size())
    device = _worker_device(cfg)  # first: NCCL's broadcast below runs on this worker's GPU
    # rank 0 decides where to resume from (every worker must load the same checkpoint) and counts the starts
    decided = [restore_point(cfg.train.checkpoint_uri or config["output"], config["run"]),
               _count_attempt(config["run_dir"])] if rank == 0 else [None, 0]  # fmt: skip
    if world > 1:
        torch.distributed.broadcast_object_list(decided, src=0)
    restore, attempt = decided
    trainer = ReplicaTrainer(cfg, rank, world, device, run=config["run"], restore_from=restore)
    trainer.attempt, trainer.failures = attempt, attempt - 1
    if rank == 0 and attempt > 1:
        logger.warning("Ray Train restarted the workers (attempt %d, %d workers): resuming from %s",
                       attempt, world, restore or "the start")  # fmt: skip
    on_step = config["on_step"]
    result = pretrain(
        cfg,
        config["data"],
        config["output"],
        resume=config["resume"] or restore is not None,
        progress=config["progress"] and rank == 0,
        run_name=config["run_name"],
        experiment=config["experiment"],
        eval_batches=config["eval_batches"],
        on_step=functools.partial(on_step, rank) if on_step is not None else None,
        trainer=trainer,
    )
    if rank != 0:
        return None
    losses = [trainer.history[s] for s in sorted(trainer.history)]  # every attempt's, not only this one's
    return dataclasses.replace(result, losses=losses, first_loss=losses[0] if losses else float("nan"),
                               last_loss=losses[-1] if losses else float("nan"))  # fmt: skip


# --------------------------------------------------------------------------- the driver


def _check_data(cfg: RaymoeConfig, data_dir: str, output: str) -> None:
    """The training loop's own checks of the data and the output, before any worker starts."""

    class Checked(Exception):
        pass

    def stop() -> None:  # pretrain builds its trainer only once the data is checked
        raise Checked

    try:
        pretrain(cfg, data_dir, output, progress=False, trainer=stop)
    except Checked:
        pass


def _absolute(location: str) -> str:
    """A local path made absolute (Ray Train workers run in their own working directory); a URI as it is."""
    return str(location) if storage.is_uri(str(location)) else str(Path(location).absolute())


def _run_name(run_name: str | None) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", run_name or "pretrain").strip("._") or "pretrain"
    return f"{slug}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def _raise_failure(exc: BaseException) -> None:
    """Re-raise a worker's error of the user's making (config, data, checkpoint, storage) as it is, else
    :class:`RayTrainError` naming every failed rank."""
    from raymoe.actors.runtime import first_line
    from raymoe.platform.checkpoint.layout import CheckpointError
    from raymoe.platform.data.shards import DataError

    # WorkerGroupError.worker_failures: rank -> the worker's exception, wrapped with its traceback by Ray Train
    failures = {rank: _unwrap(e) for rank, e in (getattr(exc, "worker_failures", None) or {}).items()}
    for error in failures.values():
        if isinstance(error, (ConfigError, DataError, CheckpointError, storage.StorageError)):
            raise error from exc
    if failures:
        lines = "; ".join(f"rank {r}: {type(e).__name__}: {first_line(e)}" for r, e in sorted(failures.items()))
        raise RayTrainError(f"the Ray Train run failed: {lines}") from exc
    raise RayTrainError(f"the Ray Train run failed: {type(exc).__name__}: {first_line(exc)}") from exc


def _unwrap(error: BaseException) -> BaseException:
    """The user's exception inside Ray Train's wrapper (``UserExceptionWithTraceback``, which keeps it private)."""
    return getattr(error, "_base_exc", None) or getattr(error, "cause", None) or error


def train_with_ray_train(
    cfg: RaymoeConfig,
    data_dir: str | Path,
    output: str | Path,
    resume: bool = False,
    progress: bool = True,
    run_name: str | None = None,
    experiment: str | None = None,
    eval_batches: int | None = None,
    on_step: Callable[[int, StepMetrics], None] | None = None,
) -> PretrainResult:
    """Pretrain ``cfg`` on ``parallel.dp`` Ray Train workers; the arguments are :func:`pretrain`'s.

    Ray is joined (``RAY_ADDRESS``) or started (:func:`~raymoe.actors.runtime.ensure_ray`). ``on_step(rank,
    metrics)`` runs in every worker after each step (it must pickle). The result is rank 0's, with
    ``losses`` of every step of the run (restarts included) and ``failures`` the restarts Ray Train made.
    Raises ConfigError (and the loop's data, checkpoint and storage errors) before starting workers, or
    from a worker; :class:`RayTrainError` when the run fails past ``elastic.max_failures``."""
    from ray.train import CheckpointConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from raymoe.actors.runtime import ensure_ray
    from raymoe.platform.tracking import resolve_tracking_uri

    check_engine(cfg)
    data_dir, output = _absolute(str(data_dir)), _absolute(str(output))
    _check_data(cfg, data_dir, output)
    tracking = cfg.tracking
    if tracking.enabled:  # the driver's MLFLOW_TRACKING_URI or working directory, not the workers'
        tracking = dataclasses.replace(tracking, uri=resolve_tracking_uri(tracking.uri))
    train = dataclasses.replace(cfg.train, checkpoint_uri=_absolute(cfg.train.checkpoint_uri)
                                if cfg.train.checkpoint_uri else "")  # fmt: skip
    cfg = dataclasses.replace(cfg, tracking=tracking, train=train)
    storage_path = storage.join(cfg.train.checkpoint_uri or output, RAY_TRAIN_DIR)
    run = _run_name(run_name)
    ensure_ray()
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={
            "cfg": cfg,
            "data": data_dir,
            "output": output,
            "resume": resume,
            "progress": progress,
            "run_name": run_name,
            "experiment": experiment,
            "eval_batches": eval_batches,
            "on_step": on_step,
            "run": run,
            "run_dir": storage.join(storage_path, run),
            "log_level": logging.getLogger("raymoe").getEffectiveLevel(),
        },  # fmt: skip
        torch_config=TorchConfig(backend=backend_of(cfg), timeout_s=int(cfg.parallel.long_timeout_s)),
        scaling_config=scaling_config(cfg),
        run_config=RunConfig(
            name=run,
            storage_path=storage_path,
            failure_config=failure_config(cfg),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_last or None),
        ),
    )
    logger.info("Ray Train run %s: %s workers, %s; its folder %s", run, scaling_config(cfg).num_workers,
                backend_of(cfg), storage.join(storage_path, run))  # fmt: skip
    try:
        result = trainer.fit()
    except Exception as exc:  # noqa: BLE001 - TrainingFailedError (and what Ray raises around it)
        _raise_failure(exc)
    if not isinstance(result.return_value, PretrainResult):
        raise RayTrainError(f"the Ray Train run {run} ended without rank 0's result (got {result.return_value!r})")
    return result.return_value
