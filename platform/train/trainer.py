"""The single-process trainer: the twin against which the actor graph is proven.

One optimizer step = forward/backward over every micro-batch (gradient accumulation), global
gradient-norm clipping, AdamW at the scheduled learning rate, then the auxiliary-loss-free bias
update from the loads of the whole step (all micro-batches, MTP MoE layers included).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field

import torch

from raymoe.platform.config import RaymoeConfig
from raymoe.platform.model import DeepseekV3
from raymoe.platform.train.balance import apply_bias_update, collect_loads, gamma_at, max_violation
from raymoe.platform.train.optim import build_optimizer, cosine_lr, set_lr

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

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def autocast_context(dtype: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 mixed precision (bf16 matmuls; fp32 weights, router, softmax, losses) or nothing."""
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_model(cfg: RaymoeConfig, device: torch.device | str = "cpu") -> DeepseekV3:
    """A freshly initialized model of ``cfg.model`` (seeded by ``cfg.train.seed``), float32."""
    model = DeepseekV3(cfg.model, seq_aux_alpha=cfg.train.seq_aux_alpha)
    model.init_weights(cfg.train.seed)
    return model.to(device)


class LocalTrainer:
    """Single-process pretraining of one model.

    Args:
        cfg: the run's config (``train`` section: schedule, clipping, λ, γ, dtype).
        model: an existing model to train (default: :func:`build_model`).
    """

    def __init__(self, cfg: RaymoeConfig, model: DeepseekV3 | None = None) -> None:
        self.cfg = cfg
        self.model = model if model is not None else build_model(cfg)
        self.model.train()
        self.device = next(self.model.parameters()).device
        self.optimizer = build_optimizer(list(self.model.named_parameters()), cfg.train)
        self.moe_layers = self.model.moe_layers()
        self.step = 0

    def train_step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> StepMetrics:
        """One optimizer step over ``micro_batches`` of (input_ids [b, S], labels [b, S]).

        The step's loss is the mean of the micro-batches' losses (equal-sized micro-batches).
        """
        t0 = time.perf_counter()
        tc = self.cfg.train
        n = len(micro_batches)
        collect_loads(self.moe_layers)  # discard counts from evaluation or generation since the last step
        sums = {"loss": 0.0, "main": 0.0, "mtp": 0.0, "aux": 0.0}
        has_mtp = has_aux = False
        tokens = 0
        for input_ids, labels in micro_batches:
            input_ids, labels = input_ids.to(self.device), labels.to(self.device)
            with autocast_context(tc.dtype, self.device):
                out = self.model.loss(input_ids, labels, mtp_lambda=tc.mtp_lambda)
            (out.loss / n).backward()
            sums["loss"] += out.loss.item() / n
            sums["main"] += out.main_loss.item() / n
            if out.mtp_loss is not None:
                has_mtp = True
                sums["mtp"] += out.mtp_loss.item() / n
            if out.aux_loss is not None:
                has_aux = True
                sums["aux"] += out.aux_loss.item() / n
            tokens += out.tokens
        params = [p for p in self.model.parameters() if p.grad is not None]
        if tc.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip, foreach=True).item()
        else:
            grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item()
        lr = cosine_lr(self.step, tc.steps, tc.lr, tc.warmup_steps, tc.min_lr_ratio)
        set_lr(self.optimizer, lr)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loads = collect_loads(self.moe_layers)
        gamma = gamma_at(self.step, tc.steps, tc.bias_update_speed, tc.bias_update_speed_final)
        biases = apply_bias_update(self.moe_layers, loads, gamma)
        metrics = StepMetrics(
            step=self.step,
            loss=sums["loss"],
            main_loss=sums["main"],
            mtp_loss=sums["mtp"] if has_mtp else None,
            aux_loss=sums["aux"] if has_aux else None,
            lr=lr,
            grad_norm=grad_norm,
            tokens=tokens,
            seconds=time.perf_counter() - t0,
            loads=loads,
            max_vio=max_violation(loads) if loads.numel() else torch.zeros(0),
            bias_min=float(biases.min()) if biases.numel() else 0.0,
            bias_max=float(biases.max()) if biases.numel() else 0.0,
        )
        self.step += 1
        return metrics

    @torch.no_grad()
    def evaluate(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, torch.Tensor]:
        """Mean main loss over ``batches`` and MaxVio_global per main MoE layer (loads summed over all of them).

        The MTP modules are not run (they do not change the main model's predictions)."""
        was_training = self.model.training
        self.model.eval()
        for moe in self.moe_layers:
            moe.count_loads = True
        collect_loads(self.moe_layers)
        total, count = 0.0, 0
        for input_ids, labels in batches:
            with autocast_context(self.cfg.train.dtype, self.device):
                out = self.model.loss(input_ids.to(self.device), labels.to(self.device), mtp_lambda=0.0)
            total += out.main_loss.item() * out.tokens
            count += out.tokens
        loads = collect_loads(self.moe_layers)
        for moe in self.moe_layers:
            moe.count_loads = None
        self.model.train(was_training)
        loads = loads[: self.cfg.model.num_moe_layers]
        return total / max(count, 1), max_violation(loads) if loads.numel() else torch.zeros(0)
