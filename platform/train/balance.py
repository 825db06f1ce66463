"""Auxiliary-loss-free load balancing (DeepSeek-V3 §2.1.2; Wang et al., arXiv 2408.15664).

After every optimizer step each expert's bias moves by γ toward balance:
``b_i ← b_i + γ · sign(mean_load − load_i)``, with loads counted over the whole step (all
micro-batches, all replicas, MTP modules' MoE layers included). The update is the paper's,
not centred. Balance is measured as MaxVio = (max load − mean load) / mean load per layer.
"""

from __future__ import annotations

import torch

from raymoe.platform.model.moe import MoE


def collect_loads(moe_layers: list[MoE], reset: bool = True) -> torch.Tensor:
    """Tokens routed to each expert since the last reset: [n_moe_layers, E] float32."""
    if not moe_layers:
        return torch.zeros(0, 0)
    loads = torch.stack([m.tokens_per_expert.detach().float().cpu().clone() for m in moe_layers])
    if reset:
        for m in moe_layers:
            m.tokens_per_expert.zero_()
    return loads


def bias_delta(loads: torch.Tensor, gamma: float) -> torch.Tensor:
    """The sign rule: γ · sign(mean load − load) per layer. loads [L, E] -> [L, E].

    A layer that saw no tokens gets no update.
    """
    mean = loads.mean(dim=-1, keepdim=True)
    return gamma * torch.sign(mean - loads)


@torch.no_grad()
def apply_bias_update(moe_layers: list[MoE], loads: torch.Tensor, gamma: float) -> torch.Tensor:
    """Add :func:`bias_delta` to every gate's bias; returns the new biases [L, E]."""
    if gamma == 0 or not moe_layers:
        return torch.stack([m.gate.e_score_correction_bias.float().cpu() for m in moe_layers]) if moe_layers else loads
    delta = bias_delta(loads, gamma)
    for m, d in zip(moe_layers, delta):
        m.gate.e_score_correction_bias += d.to(m.gate.e_score_correction_bias)
    return torch.stack([m.gate.e_score_correction_bias.float().cpu() for m in moe_layers])


def max_violation(loads: torch.Tensor) -> torch.Tensor:
    """MaxVio per layer: (max load − mean load) / mean load. loads [L, E] -> [L] (0 where no tokens)."""
    mean = loads.mean(dim=-1)
    vio = (loads.max(dim=-1).values - mean) / mean.clamp_min(1e-12)
    return torch.where(mean > 0, vio, torch.zeros_like(vio))


def gamma_at(step: int, total_steps: int, gamma: float, gamma_final: float | None) -> float:
    """Bias update speed at ``step`` (0-based): constant, or linear from γ to ``gamma_final`` at the last step."""
    if gamma_final is None or total_steps <= 1:
        return gamma
    frac = min(max(step / (total_steps - 1), 0.0), 1.0)
    return gamma + (gamma_final - gamma) * frac
