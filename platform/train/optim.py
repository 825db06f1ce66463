"""AdamW with decoupled weight decay on matrices only, and the warmup-then-cosine schedule.

Only parameters that require a gradient are optimized (a fine-tune freezes the rest). A parameter
of which only some rows train (ESFT's selected experts in a stacked expert tensor) carries those
rows as ``row_mask`` (:func:`raymoe.platform.train.finetune.restrict`): its gradient's other rows
are zero, so AdamW leaves them bit-identical, and its weight decay is applied to its rows only
(:func:`decay_masked_rows`, before the step, as AdamW's own decoupled decay would).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from raymoe.platform.config import TrainConfig


def param_groups(params: list[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """AdamW groups of the parameters that train: matrices (decayed), 1-D params (not decayed), and
    matrices that train in some rows only (``row_mask``: decayed there by :func:`decay_masked_rows`)."""
    trained = [p for _, p in params if p.requires_grad]
    masked = [p for p in trained if getattr(p, "row_mask", None) is not None]
    decay = [p for p in trained if p.ndim >= 2 and getattr(p, "row_mask", None) is None]
    no_decay = [p for p in trained if p.ndim < 2 and getattr(p, "row_mask", None) is None]
    groups = [{"params": decay, "weight_decay": weight_decay}] if decay else []
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if masked:
        groups.append({"params": masked, "weight_decay": 0.0, "row_decay": weight_decay})
    return groups


def build_optimizer(params: list[tuple[str, nn.Parameter]], train: TrainConfig) -> torch.optim.AdamW | None:
    """AdamW over named parameters with the config's lr, betas and weight decay (fp32 state); None when
    nothing trains (a fine-tune's frozen part: an expert shard without selected experts steps nothing)."""
    groups = param_groups(params, train.weight_decay)
    if not groups:
        return None
    return torch.optim.AdamW(
        groups,
        lr=train.lr,
        betas=(train.beta1, train.beta2),
        eps=1e-8,
        fused=True,  # one pass over params and state: measured 2-3x less optimizer time than foreach on CPU
    )


def cosine_lr(step: int, total_steps: int, lr: float, warmup_steps: int, min_lr_ratio: float) -> float:
    """Learning rate at ``step`` (0-based): linear warmup over ``warmup_steps``, then cosine to ``lr·min_lr_ratio``."""
    if warmup_steps and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    min_lr = lr * min_lr_ratio
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


@torch.no_grad()
def decay_masked_rows(optimizer: torch.optim.Optimizer) -> None:
    """AdamW's decoupled weight decay, ``p ← p·(1 − lr·wd)``, on the trained rows of row-masked parameters only."""
    for group in optimizer.param_groups:
        wd = group.get("row_decay", 0.0)
        if wd:
            for p in group["params"]:
                p[p.row_mask] *= 1.0 - group["lr"] * wd


def optimizer_step(optimizer: torch.optim.Optimizer | None, lr: float) -> None:
    """One AdamW step at ``lr`` (row-masked decay first), then the gradients are dropped; nothing when None."""
    if optimizer is None:
        return
    set_lr(optimizer, lr)
    decay_masked_rows(optimizer)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def clip_coefficient(grad_norm: float, grad_clip: float) -> float:
    """The global-norm clipping coefficient ``min(grad_clip / (norm + 1e-6), 1)`` (1 when ``grad_clip`` is 0)."""
    return min(grad_clip / (grad_norm + 1e-6), 1.0) if grad_clip > 0 else 1.0


def clip_and_step(params: list[torch.Tensor], optimizer: torch.optim.Optimizer | None, lr: float,
                  clip_coef: float) -> None:  # fmt: skip
    """Scale the gradients by ``clip_coef`` (a global-norm coefficient), step at ``lr``, drop them.

    The fused AdamW applies the coefficient in its own pass (as its ``grad_scale``, the gradients
    divided by ``1 / clip_coef``), instead of a separate pass over every gradient: 13 ms a step saved
    on the bench preset (75 M float32 gradients, 2 cores, 2026-12-03). Without an optimizer the
    gradients are scaled in place."""
    if clip_coef != 1.0 and optimizer is not None and all(g.get("fused") for g in optimizer.param_groups):
        device = optimizer.param_groups[0]["params"][0].device  # moved to each other device by AdamW
        optimizer.grad_scale = torch.tensor(1.0 / clip_coef, device=device)
        try:
            optimizer_step(optimizer, lr)
        finally:
            del optimizer.grad_scale
        return
    grads = [p.grad for p in params if p.grad is not None]
    if clip_coef != 1.0 and grads:
        torch._foreach_mul_(grads, clip_coef)
    optimizer_step(optimizer, lr)
