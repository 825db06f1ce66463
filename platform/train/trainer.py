"""The single-process trainer: the twin against which the actor graph is proven.

One optimizer step = forward/backward over every micro-batch (gradient accumulation), global
gradient-norm clipping, AdamW at the scheduled learning rate, then the auxiliary-loss-free bias
update from the loads of the whole step (all micro-batches, MTP MoE layers included).

Its checkpoints are the training layout every trainer writes (:mod:`raymoe.platform.checkpoint.sharded`),
as one part holding the whole model; they load into any layout of the actor graph and back.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from raymoe.platform.checkpoint.layout import COLOCATED_FILE, OPTIMIZER_PREFIX, CheckpointError, split_experts
from raymoe.platform.checkpoint.reader import load_into, open_checkpoint
from raymoe.platform.checkpoint.sharded import (
    load_optimizer_state,
    optimizer_state_tensors,
    save_checkpoint,
    set_rng_state,
    write_part,
)
from raymoe.platform.config import RaymoeConfig, config_to_dict, model_config_to_hf
from raymoe.platform.devices import resolve_device, train_dtype, tune_host_allocator
from raymoe.platform.model import DeepseekV3
from raymoe.platform.model.forward import compile_regions
from raymoe.platform.train.balance import LoadCounter, apply_bias_update, gamma_at, max_violation
from raymoe.platform.train.optim import build_optimizer, clip_and_step, clip_coefficient, cosine_lr

logger = logging.getLogger(__name__)


@dataclass
class StepMetrics:
    """What one optimizer step measured."""

    step: int
    loss: float
    main_loss: float
    mtp_loss: float | None
    aux_loss: float | None
    lr: float
    grad_norm: float
    tokens: int
    seconds: float
    loads: torch.Tensor  # [n_moe_layers, E] tokens routed per expert this step
    max_vio: torch.Tensor  # [n_moe_layers]
    bias_min: float
    bias_max: float
    extra: dict = field(default_factory=dict)
    biases: torch.Tensor | None = None  # [n_moe_layers, E] the gate biases after this step's update

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


class StepRewound(RuntimeError):
    """A trainer's step failed and the trainer restored itself from its latest checkpoint (the elastic graph).

    ``state`` is that checkpoint's trainer state (None: there was none, it starts from step 0);
    the training loop rewinds its data to it. ``metrics`` are worth logging (the new layout).
    ``detected_at`` is the ``time.perf_counter()`` of the failure's detection, before the trainer
    rebuilt and restored itself (recovery time is counted from it)."""

    def __init__(
        self,
        cause: str,
        state: dict[str, Any] | None,
        metrics: dict[str, float] | None = None,
        detected_at: float | None = None,
    ) -> None:
        super().__init__(cause)
        self.cause = cause
        self.state = state
        self.metrics = metrics or {}
        self.detected_at = detected_at if detected_at is not None else time.perf_counter()


def autocast_context(dtype: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """bf16 mixed precision (bf16 matmuls; fp32 weights, router, softmax, losses) or nothing; ``auto`` is
    bf16 where ``device`` runs bf16 products fast (:func:`~raymoe.platform.devices.train_dtype`)."""
    if train_dtype(dtype, device) == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_model(cfg: RaymoeConfig, device: torch.device | str = "cpu") -> DeepseekV3:
    """A freshly initialized model of ``cfg.model`` (seeded by ``cfg.train.seed``), float32; or, with
    ``train.init_from``, the weights of that checkpoint (any layout)."""
    if cfg.train.init_from:
        from raymoe.platform.checkpoint.reader import load_model

        model = load_model(cfg.train.init_from, device=device, seq_aux_alpha=cfg.train.seq_aux_alpha)
        check_same_model(cfg, model.cfg, cfg.train.init_from)
        return model.train()
    model = DeepseekV3(cfg.model, seq_aux_alpha=cfg.train.seq_aux_alpha)
    model.init_weights(cfg.train.seed)
    return model.to(device)


def check_same_model(cfg: RaymoeConfig, found: Any, where: str) -> None:
    """ConfigError when a checkpoint's model config differs from the run's in a field that matters."""
    import dataclasses

    from raymoe.platform.config import ConfigError

    differ = [f.name for f in dataclasses.fields(found) if getattr(found, f.name) != getattr(cfg.model, f.name)]
    shape = [f for f in differ if f not in ("bos_token_id", "eos_token_id", "initializer_range")]
    if shape:
        raise ConfigError(
            f"train.init_from={where}: its model differs from model.* in {', '.join(shape)} "
            f"(e.g. model.{shape[0]}={getattr(found, shape[0])!r} there, {getattr(cfg.model, shape[0])!r} here)"
        )


STEP_SUMS = ("loss", "main", "mtp", "aux", "tokens", "has_mtp", "has_aux")  # a step's summed metrics, in order


class LocalTrainer:
    """Single-process pretraining of one model.

    Args:
        cfg: the run's config (``train`` section: schedule, clipping, λ, γ, dtype).
        model: an existing model to train (default: :func:`build_model`).
    """

    kind = "local"

    def __init__(self, cfg: RaymoeConfig, model: DeepseekV3 | None = None) -> None:
        self.cfg = cfg
        tune_host_allocator()  # every step's large casts and gradients reuse heap memory, not fresh mappings
        self.model = model if model is not None else build_model(cfg, resolve_device(cfg.parallel.device))
        self.model.train()
        compile_regions(self.model, cfg.train.compile)
        self.device = self.model.device
        from raymoe.platform.train.finetune import restrict

        restrict(list(self.model.named_parameters()), cfg)  # a fine-tune's frozen parameters (full: none)
        self.optimizer = build_optimizer(list(self.model.named_parameters()), cfg.train)
        self.moe_layer_ids = list(self.model.moe_by_layer())
        self.gates = self.model.gates()
        self.step = 0

    @property
    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def describe(self) -> dict[str, Any]:
        return {"trainer": self.kind, "trainer.param_bytes": self.param_bytes}

    def train_step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> StepMetrics:
        """One optimizer step over ``micro_batches`` of (input_ids [b, S], labels [b, S]).

        The step's loss is the mean of the micro-batches' losses (equal-sized micro-batches).
        Subclasses run a share of them (:meth:`_mine`) and sum across processes (:meth:`_reduce`)."""
        t0 = time.perf_counter()
        n = len(micro_batches)  # every micro-batch weighs 1 / n wherever it runs
        counter = LoadCounter(self.moe_layer_ids, self.cfg.model.n_routed_experts)
        sums = dict.fromkeys(STEP_SUMS, 0.0)
        for input_ids, labels in self._mine(micro_batches):
            input_ids, labels = input_ids.to(self.device), labels.to(self.device)
            with autocast_context(self.cfg.train.dtype, self.device):
                out = self.model.loss(input_ids, labels, mtp_lambda=self.cfg.train.mtp_lambda, hooks=counter)
            (out.loss / n).backward()
            sums["loss"] += out.loss.item() / n
            sums["main"] += out.main_loss.item() / n
            if out.mtp_loss is not None:
                sums["mtp"], sums["has_mtp"] = sums["mtp"] + out.mtp_loss.item() / n, 1.0
            if out.aux_loss is not None:
                sums["aux"], sums["has_aux"] = sums["aux"] + out.aux_loss.item() / n, 1.0
            sums["tokens"] += out.tokens
        sums, loads = self._reduce(sums, counter.loads())
        return self._update(sums, loads, t0)

    def _mine(self, micro_batches: list) -> list:
        """The micro-batches this process runs: all of them."""
        return micro_batches

    def _reduce(self, sums: dict[str, float], loads: torch.Tensor) -> tuple[dict[str, float], torch.Tensor]:
        """The step's gradients, metric sums and loads over every process that ran a share: here, as they are."""
        return sums, loads

    def _update(self, sums: dict[str, float], loads: torch.Tensor, t0: float) -> StepMetrics:
        """Clip, the AdamW step and the bias update from the step's sums and loads; the step's metrics."""
        tc = self.cfg.train
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True).item() if params else 0.0
        lr = cosine_lr(self.step, tc.steps, tc.lr, tc.warmup_steps, tc.min_lr_ratio)
        clip_and_step(params, self.optimizer, lr, clip_coefficient(grad_norm, tc.grad_clip))
        gamma = gamma_at(self.step, tc.steps, tc.bias_update_speed, tc.bias_update_speed_final)
        biases = apply_bias_update(self.gates, loads, gamma)
        metrics = StepMetrics(
            step=self.step,
            loss=sums["loss"],
            main_loss=sums["main"],
            mtp_loss=sums["mtp"] if sums["has_mtp"] else None,
            aux_loss=sums["aux"] if sums["has_aux"] else None,
            lr=lr,
            grad_norm=grad_norm,
            tokens=int(sums["tokens"]),
            seconds=time.perf_counter() - t0,
            loads=loads,
            max_vio=max_violation(loads) if loads.numel() else torch.zeros(0),
            bias_min=float(biases.min()) if biases.numel() else 0.0,
            bias_max=float(biases.max()) if biases.numel() else 0.0,
            biases=biases,
        )
        self.step += 1
        return metrics

    @torch.no_grad()
    def evaluate(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, torch.Tensor]:
        """Mean main loss over ``batches`` and MaxVio_global per main MoE layer (loads summed over all of them).

        The MTP modules are not run (they do not change the main model's predictions)."""
        was_training = self.model.training
        self.model.eval()
        main_layers = [layer for layer in self.moe_layer_ids if layer < self.cfg.model.num_hidden_layers]
        counter = LoadCounter(main_layers, self.cfg.model.n_routed_experts)
        total, count = 0.0, 0
        for input_ids, labels in batches:
            with autocast_context(self.cfg.train.dtype, self.device):
                out = self.model.loss(input_ids.to(self.device), labels.to(self.device), mtp_lambda=0.0, hooks=counter)
            total += out.main_loss.item() * out.tokens
            count += out.tokens
        self.model.train(was_training)
        loads = counter.loads()
        return total / max(count, 1), max_violation(loads) if loads.numel() else torch.zeros(0)

    @torch.no_grad()
    def record(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list:
        """The routing of every MoE layer (MTP modules included) over each of ``batches``: one
        :class:`~raymoe.platform.analysis.capture.RoutingRecord` each (as ``GraphTrainer.record``)."""
        from raymoe.platform.analysis.experts import LocalSource

        was_training = self.model.training
        try:
            return LocalSource(self.model, keep_scores=False, dtype=self.cfg.train.dtype).record(batches)
        finally:
            self.model.train(was_training)

    # -- checkpoints ------------------------------------------------------------------------

    def biases(self) -> torch.Tensor:
        """The gates' biases [n_moe_layers, E] (main layers, then MTP modules)."""
        if not self.gates:
            return torch.zeros(0, self.cfg.model.n_routed_experts)
        return torch.stack([g.e_score_correction_bias.detach().float().cpu() for g in self.gates])

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Parameters, gate biases and AdamW state, in checkpoint names (routed experts one by one)."""
        tensors = dict(self.model.state_dict())
        tensors.update(optimizer_state_tensors(list(self.model.named_parameters()), self.optimizer))
        return split_experts(tensors)

    def save_checkpoint(self, root: str, state: dict[str, Any], extra_files: list | None = None) -> str:
        """The checkpoint of now under ``root`` (a path or URI), one part holding the whole model."""
        full = {
            "trainer": self.kind,
            "parallel": {"dp": 1, "pp": 1, "ep": 1},
            "biases": self.biases().tolist(),
            "config": config_to_dict(self.cfg),
            **state,
        }
        parts = lambda d: [write_part(d, COLOCATED_FILE, self.state_tensors())]  # noqa: E731
        hf_config = model_config_to_hf(self.cfg.model)
        return save_checkpoint(root, self.step, parts, full, hf_config, extra_files or [], self.cfg.train.keep_last)

    def load_checkpoint(self, path: str) -> dict[str, Any]:
        """Restore weights, biases, AdamW state, step and RNG from a training checkpoint of any layout."""
        reader = open_checkpoint(str(path))
        if reader.state is None:
            raise CheckpointError(f"{path} is not a training checkpoint: it has no trainer state to resume")
        check_same_model(self.cfg, reader.model_config, str(path))
        targets = dict(self.model.state_dict())
        named = list(self.model.named_parameters())
        optim = {f"{OPTIMIZER_PREFIX}{n}.{k}": (torch.zeros(()) if k == "step" else torch.empty_like(p.data))
                 for n, p in named for k in ("exp_avg", "exp_avg_sq", "step")}  # fmt: skip
        # optimizer state of parameters that never had a gradient is absent: they keep none
        absent = load_into({**targets, **optim}, reader, optional=lambda n: n.startswith(OPTIMIZER_PREFIX))
        load_optimizer_state(named, self.optimizer, {k: v for k, v in optim.items() if k not in absent})
        self.step = int(reader.state["step"])
        if "rng" in reader.state:
            set_rng_state(reader.state["rng"])
        return reader.state

    def close(self) -> None:
        pass
