"""Auxiliary-loss-free load balancing (DeepSeek-V3 §2.1.2; Wang et al., arXiv 2408.15664).

After every optimizer step each expert's bias moves by γ toward balance:
``b_i ← b_i + γ · sign(mean_load − load_i)``, with loads counted over the whole step (all
micro-batches, all replicas, MTP modules' MoE layers included). The update is the paper's,
not centred. Balance is measured as MaxVio = (max load − mean load) / mean load per layer.
"""

from __future__ import annotations

import torch

from raymoe.platform.model.forward import Hooks


class LoadCounter(Hooks):
    """Forward hooks that count the tokens routed to each expert of the MoE layers ``layers``.

    ``loads()`` is [len(layers), E] float32 (exact past 256, unlike bf16) in the order of ``layers``
    (main layers, then MTP modules: :class:`~raymoe.platform.model.transformer.DeepseekV3`'s
    ``moe_by_layer`` order); ``reset()`` starts again. Routing of other layers is ignored. ``inner``
    hooks (e.g. a :class:`~raymoe.platform.analysis.capture.RoutingRecorder`) see the routing and predictions too."""

    def __init__(self, layers: list[int], n_experts: int, inner: Hooks | None = None) -> None:
        self.index = {layer: i for i, layer in enumerate(layers)}
        self.counts = torch.zeros(len(layers), n_experts)
        self.inner = inner

    def route(self, layer: int, idx: torch.Tensor, weights: torch.Tensor, scores: torch.Tensor) -> None:
        i = self.index.get(layer)
        if i is not None:
            self.counts[i] += torch.bincount(idx.reshape(-1), minlength=self.counts.shape[1]).to(self.counts).cpu()
        if self.inner is not None:
            self.inner.route(layer, idx, weights, scores)

    @property
    def wants_predictions(self) -> bool:  # type: ignore[override]
        return self.inner is not None and self.inner.wants_predictions

    def predicted(self, depth: int, tokens: torch.Tensor) -> None:
        if self.inner is not None:
            self.inner.predicted(depth, tokens)

    def loads(self) -> torch.Tensor:
        return self.counts.clone()

    def reset(self) -> None:
        self.counts.zero_()


def bias_delta(loads: torch.Tensor, gamma: float) -> torch.Tensor:
    """The sign rule: γ · sign(mean load − load) per layer. loads [L, E] -> [L, E].

    A layer that saw no tokens gets no update.
    """
    mean = loads.mean(dim=-1, keepdim=True)
    return gamma * torch.sign(mean - loads)


@torch.no_grad()
def apply_bias_update(gates: list[torch.nn.Module], loads: torch.Tensor, gamma: float) -> torch.Tensor:
    """Add :func:`bias_delta` to every gate's bias (in the order of ``loads``' rows); the new biases [L, E]."""
    if gates and gamma != 0:
        for gate, d in zip(gates, bias_delta(loads, gamma)):
            gate.e_score_correction_bias += d.to(gate.e_score_correction_bias)
    if not gates:
        return torch.zeros(0, loads.shape[-1] if loads.ndim == 2 else 0)
    return torch.stack([gate.e_score_correction_bias.float().cpu() for gate in gates])


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
