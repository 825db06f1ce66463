"""The pretraining loop of every trainer: data, steps, evaluation, checkpoints, tracking, resume.

``pretrain`` reads like the loop it is: take the next global batch from the resumable loader,
run one optimizer step (the bias update included), log it, evaluate and checkpoint every so
often. ``resume=True`` continues from the latest complete checkpoint in ``output``: weights,
biases, optimizer state, step, loader position and RNG, so the losses are those of a run that
was never interrupted. A trainer that recovers from failures itself (the elastic actor graph)
raises :class:`~raymoe.platform.train.trainer.StepRewound` after restoring its latest checkpoint,
and the loop rewinds its data to that checkpoint's position.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from raymoe.platform import storage
from raymoe.platform.checkpoint.layout import TOKENIZER_FILE, latest_checkpoint
from raymoe.platform.config import ConfigError, ModelConfig, RaymoeConfig, config_to_dict, flatten
from raymoe.platform.data.loader import ShardLoader, iter_batches, to_batch
from raymoe.platform.train.trainer import LocalTrainer, StepMetrics, StepRewound

logger = logging.getLogger(__name__)


@dataclass
class PretrainResult:
    """What a pretraining run produced."""

    output: str
    checkpoint: str
    steps: int
    first_loss: float  # loss of the first step this process ran
    last_loss: float
    losses: list[float]  # per step run by this process
    tokens_per_s: float
    val_loss: float
    max_vio_global: float  # mean over MoE layers, on the validation set
    max_vio_batch_tail: float  # mean MaxVio_batch over the last fifth of the steps
    run_id: str | None
    tracking_warning: str | None
    failures: int = 0  # actor-graph failures recovered from
    recovery_s: list[float] = dataclasses.field(default_factory=list)  # detection -> next completed step


def micro_batches(input_ids: torch.Tensor, labels: torch.Tensor, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Split a global batch [B, S] into ``n`` equal micro-batches."""
    return list(zip(input_ids.chunk(n), labels.chunk(n)))


def evaluate(
    trainer: Any, data_dir: str | Path, batch_size: int, max_batches: int | None = None
) -> tuple[float, torch.Tensor]:
    """Validation loss and MaxVio_global per MoE layer over the validation split (fixed order)."""
    batches = []
    for i, batch in enumerate(iter_batches(data_dir, "validation", batch_size=batch_size)):
        if max_batches is not None and i >= max_batches:
            break
        batches.append(batch)
    if not batches:
        return float("nan"), torch.zeros(0)
    return trainer.evaluate(batches)


def pretrain(
    cfg: RaymoeConfig,
    data_dir: str | Path,
    output: str | Path,
    resume: bool = False,
    progress: bool = True,
    run_name: str | None = None,
    experiment: str | None = None,
    eval_batches: int | None = None,
    on_step: Callable[[StepMetrics], None] | None = None,
    trainer: Any = None,
) -> PretrainResult:
    """Pretrain ``cfg`` on the prepared data in ``data_dir`` (a path or URI); checkpoints and logs go to ``output``.

    ``trainer`` runs the steps: a trainer object (``LocalTrainer``, or the actor graph's from
    ``raymoe.actors.trainers.build_trainer``), a function that builds one (called once the data is
    checked, so that a bad ``--data`` starts nothing), or None for a :class:`LocalTrainer`. A
    trainer this function built is closed at the end. Checkpoints go to ``train.checkpoint_uri``
    when set (a path or URI), else under ``output`` (a path or URI)."""
    tc = cfg.train
    loader = ShardLoader(data_dir, split="train", batch_size=tc.batch_size, seed=tc.seed)
    manifest = loader.store.manifest
    if manifest.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the data's tokenizer "
            f"({manifest.vocab_size} ids in {data_dir})"
        )
    if manifest.seq_len != tc.seq_len:
        raise ConfigError(
            f"train.seq_len ({tc.seq_len}) differs from the data's sequence length ({manifest.seq_len} in {data_dir}); "
            f"set train.seq_len={manifest.seq_len} or prepare the data with --seq-len {tc.seq_len}"
        )
    output = str(output)
    if cfg.data.record_samples and storage.is_uri(output):
        raise ConfigError(
            f"data.record_samples writes OUTPUT/{SAMPLES_FILE}: --output must be a local path, got {output}"
        )
    if not storage.is_uri(output):
        Path(output).mkdir(parents=True, exist_ok=True)
    n_micro = cfg.parallel.micro_batches * cfg.parallel.dp  # the global batch's micro-batches, on any trainer
    eval_batch = tc.batch_size  # forward only: the loss per token and the loads do not depend on it
    ckpt_root = tc.checkpoint_uri or output
    torch.manual_seed(tc.seed)
    owned = trainer is None or not hasattr(trainer, "train_step")
    if trainer is None:
        trainer = LocalTrainer(cfg)
    elif owned:
        trainer = trainer()
    try:
        return _pretrain(cfg, trainer, loader, str(data_dir), output, ckpt_root, resume, progress,
                         run_name, experiment, eval_batches, on_step, n_micro, eval_batch)  # fmt: skip
    finally:
        if owned:
            trainer.close()


def _pretrain(cfg, trainer, loader, data_dir, output, ckpt_root, resume, progress, run_name,  # noqa: ANN001, ANN202, PLR0913, PLR0915
              experiment, eval_batches, on_step, n_micro, eval_batch):  # fmt: skip
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from raymoe.platform.plots import moe_layer_names
    from raymoe.platform.tracking import Tracker

    tc = cfg.train
    run_id = None
    record = SampleRecord(Path(output) / SAMPLES_FILE) if cfg.data.record_samples else None
    loads = RunLoads(cfg.model)
    if resume:
        ckpt = latest_checkpoint(ckpt_root)
        if ckpt is None:
            logger.warning("--resume: no checkpoint in %s yet; starting from step 0", ckpt_root)
        else:
            state = trainer.load_checkpoint(ckpt)
            loader.load_state_dict(state["loader"])
            run_id = state.get("mlflow_run_id")
            loads.resume(state.get("expert_loads"), ckpt)
            logger.info("resumed from %s at step %d", ckpt, trainer.step)
    if record is not None:
        record.truncate(trainer.step)  # steps after the checkpoint are done again
    tracker = Tracker(cfg.tracking, run_name=run_name, experiment=experiment, run_id=run_id,
                      register_as=cfg.tracking.registered_model)  # fmt: skip
    m_cfg = cfg.model
    tracker.history.layer_names = moe_layer_names(m_cfg.num_hidden_layers, m_cfg.first_k_dense_replace,
                                                  m_cfg.num_nextn_predict_layers)  # fmt: skip
    tracker.start(flatten(config_to_dict(cfg)) | {"data.path": data_dir} | trainer.describe())
    tokenizer = storage.join(data_dir, TOKENIZER_FILE)
    extra = [tokenizer] if storage.is_file(tokenizer) else []
    if extra and trainer.step == 0:
        tracker.log_text(storage.read_bytes(tokenizer).decode(), TOKENIZER_FILE)
    boundary = getattr(trainer, "at_step_boundary", None)  # the elastic graph grows or resizes between steps

    def checkpoint() -> str:
        state = {"loader": loader.state_dict(), "mlflow_run_id": tracker.run_id,  # the trainer adds its config
                 "expert_loads": loads.to_dict(trainer.step)}  # fmt: skip
        return trainer.save_checkpoint(ckpt_root, state, extra)

    losses: dict[int, float] = {}
    vios: dict[int, float] = {}
    tokens, seconds = 0, 0.0
    last_ckpt: str | None = None
    start = trainer.step
    recovering_since: float | None = None
    recoveries: list[float] = []
    status = "FAILED"
    try:
        with logging_redirect_tqdm():
            bar = tqdm(total=tc.steps, initial=start, desc="pretrain", disable=None if progress else True, unit="step",
                       dynamic_ncols=True)  # fmt: skip
            while trainer.step < tc.steps:
                try:
                    if boundary is not None and (changed := boundary(checkpoint)):
                        tracker.log_metrics(changed, trainer.step)
                    step = trainer.step
                    indices = loader.next_indices()
                    epoch = loader.epoch
                    input_ids, labels = to_batch(loader.store.rows(indices))
                    m = trainer.train_step(micro_batches(input_ids, labels, n_micro))
                    if record is not None:
                        record.add(step, epoch, indices)
                    losses[step] = m.loss
                    loads.add(step, m.loads)
                    vios[step] = float(m.max_vio.mean()) if m.max_vio.numel() else 0.0
                    if step > start:  # the first step pays one-time costs
                        tokens, seconds = tokens + m.tokens, seconds + m.seconds
                    if recovering_since is not None:  # from detection to this completed step
                        recoveries.append(time.perf_counter() - recovering_since)
                        m.extra["elastic/recovery_s"] = recoveries[-1]
                        logger.warning("recovered: step %d done %.1f s after the failure was detected", step,
                                       recoveries[-1])  # fmt: skip
                        recovering_since = None
                    tracker.log_step(m)
                    if on_step is not None:
                        on_step(m)
                    bar.update(1)
                    bar.set_postfix(loss=f"{m.loss:.3f}", tok_s=f"{m.tokens_per_s:,.0f}", maxvio=f"{vios[step]:.2f}")
                    if tc.log_every and (step % tc.log_every == 0 or step == tc.steps - 1):
                        _log(m)
                    done = trainer.step
                    if tc.eval_every and done % tc.eval_every == 0 and done < tc.steps:
                        val_loss, vio = evaluate(trainer, data_dir, eval_batch, eval_batches)
                        tracker.log_eval(done, val_loss, vio)
                        logger.info("step %d validation loss %.4f MaxVio_global %.3f", done, val_loss, _mean(vio))
                    if tc.checkpoint_every and done % tc.checkpoint_every == 0 and done < tc.steps:
                        last_ckpt = checkpoint()
                except StepRewound as rewound:  # the trainer recovered from a failure: redo from its checkpoint
                    recovering_since = rewound.detected_at  # before the rebuild and the restore
                    tracker.set_tag("elastic.last_failure", rewound.cause[:500])
                    tracker.log_metrics({"elastic/failures": getattr(trainer, "failures", 0)} | rewound.metrics,
                                        trainer.step)  # fmt: skip
                    if rewound.state is None:  # no checkpoint yet: from the start
                        loader.load_state_dict(
                            ShardLoader(data_dir, split="train", batch_size=tc.batch_size, seed=tc.seed).state_dict()
                        )
                    else:
                        loader.load_state_dict(rewound.state["loader"])
                    if record is not None:
                        record.truncate(trainer.step)
                    for s in [s for s in losses if s >= trainer.step]:
                        del losses[s], vios[s]
                    loads.drop_from(trainer.step)
                    bar.n = trainer.step
            bar.close()
        val_loss, vio = evaluate(trainer, data_dir, eval_batch, eval_batches)
        tracker.log_eval(trainer.step, val_loss, vio)
        if last_ckpt is None or trainer.step != start:
            last_ckpt = checkpoint()
        status = "FINISHED"
    finally:
        tracker.finish(status=status, checkpoint=str(last_ckpt) if last_ckpt else None)
    ordered = [losses[s] for s in sorted(losses)]
    vio_list = [vios[s] for s in sorted(vios)]
    tail = vio_list[-max(len(vio_list) // 5, 1) :] if vio_list else [float("nan")]
    return PretrainResult(
        output=output,
        checkpoint=last_ckpt,
        steps=trainer.step,
        first_loss=ordered[0] if ordered else float("nan"),
        last_loss=ordered[-1] if ordered else float("nan"),
        losses=ordered,
        tokens_per_s=tokens / seconds if seconds else 0.0,
        val_loss=val_loss,
        max_vio_global=_mean(vio),
        max_vio_batch_tail=sum(tail) / len(tail),
        run_id=tracker.run_id,
        tracking_warning=tracker.warning,
        failures=getattr(trainer, "failures", 0),
        recovery_s=recoveries,
    )


SAMPLES_FILE = "samples.jsonl"


class SampleRecord:
    """``samples.jsonl``: for every completed step, the epoch and ids of its samples (``data.record_samples``).

    Steps that are done again after a rewind replace their earlier lines, so the record is that of
    the run as it counts: every sample once per epoch."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def add(self, step: int, epoch: int, indices: torch.Tensor) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "epoch": epoch, "ids": indices.tolist()}) + "\n")

    def truncate(self, step: int) -> None:
        """Drop the lines of ``step`` and later (they will be done again)."""
        if not self.path.is_file():
            return
        keep = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] < step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.path)

    def read(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]


def _mean(x: torch.Tensor) -> float:
    """Mean over the MoE layers that saw tokens (an unused MTP layer reports 0)."""
    return float(x.mean()) if x.numel() else math.nan


def _log(m: StepMetrics) -> None:
    logger.info(
        "step %d loss %.4f main %.4f mtp %s lr %.2e maxvio %.3f bias [%.4f, %.4f] %.0f tok/s",
        m.step, m.loss, m.main_loss, f"{m.mtp_loss:.4f}" if m.mtp_loss is not None else "-", m.lr,
        float(m.max_vio.mean()) if m.max_vio.numel() else 0.0, m.bias_min, m.bias_max, m.tokens_per_s,
    )  # fmt: skip


class RunLoads:
    """The tokens routed to each expert over a run, per step (so that a rewind drops the steps it redoes),
    on top of what a resumed checkpoint had counted; saved in each checkpoint as ``expert_loads``
    (:class:`~raymoe.platform.analysis.loads.ExpertLoads`, source ``training``)."""

    def __init__(self, model_cfg: ModelConfig) -> None:
        from raymoe.platform.inference.tiers import moe_layers

        self.layers = moe_layers(model_cfg) if model_cfg.n_routed_experts > 0 else []
        self.top_k = max(model_cfg.num_experts_per_tok, 1)
        self.base = torch.zeros(len(self.layers), max(model_cfg.n_routed_experts, 0), dtype=torch.float64)
        self.base_steps = 0
        self.steps: dict[int, torch.Tensor] = {}

    def resume(self, saved: dict | None, where: str) -> None:
        """Start from a checkpoint's counts (ignored when they are of another model)."""
        from raymoe.platform.analysis.loads import ExpertLoads

        if saved is not None:
            got = ExpertLoads.from_dict(saved, f"{where} expert_loads")
            if got.layers == self.layers and got.loads.shape == self.base.shape:
                self.base, self.base_steps = got.loads, int(got.detail.get("steps", 0))

    def add(self, step: int, loads: torch.Tensor) -> None:
        if self.base.numel() == 0:  # no routed experts: nothing to count
            return
        if loads.shape != self.base.shape:  # a trainer's bug: counts of other layers would rank the wrong experts
            raise ValueError(
                f"step {step}: the trainer's loads are {list(loads.shape)}; the model's MoE layers {self.layers} "
                f"and experts need {list(self.base.shape)}"
            )
        self.steps[step] = loads.double().cpu()

    def drop_from(self, step: int) -> None:
        for s in [s for s in self.steps if s >= step]:
            del self.steps[s]

    def to_dict(self, step: int) -> dict:
        """The counts of every step before ``step`` (the checkpoint's), JSON-ready."""
        from raymoe.platform.analysis.loads import ExpertLoads

        counted = [s for s in self.steps if s < step]
        total = self.base + sum((self.steps[s] for s in counted), torch.zeros_like(self.base))
        tokens = round(float(total[0].sum()) / self.top_k) if total.numel() else 0  # rows through a main layer
        return ExpertLoads(self.layers, total, tokens, "training", {"steps": self.base_steps + len(counted)}).to_dict()
