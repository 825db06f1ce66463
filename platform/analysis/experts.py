"""What the experts learn: the metrics of :mod:`~raymoe.platform.analysis.metrics` over a checkpoint's routing.

A :class:`RoutingSource` is whatever runs the model: :class:`LocalSource` (one process, the model's own
experts) or the actor graph's (``raymoe.actors.analysis.GraphSource``); both record routing from the
one forward and evaluate the main loss, and let the gates' biases be set (the masking ablation).
:func:`routing_report` turns the records of every domain into JSON-ready numbers per MoE layer,
:func:`saturation_report` compares a run's checkpoints with its final one, and
:func:`masking_ablation` masks experts and measures the loss on every domain.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from raymoe.platform.analysis import metrics as m
from raymoe.platform.analysis.capture import RoutingRecord, RoutingRecorder
from raymoe.platform.model import forward
from raymoe.platform.model.transformer import DeepseekV3
from raymoe.platform.plots import layer_name
from raymoe.platform.train.trainer import autocast_context

logger = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]  # input_ids, labels [b, S]
RECORD_MTP_LAMBDA = 1.0  # any λ > 0 runs the MTP modules; a recording forward's loss is not used


class RoutingSource(Protocol):
    """A model to analyze: it records routing, evaluates losses and takes new gate biases."""

    def record(self, batches: list[Batch]) -> list[RoutingRecord]:
        """One :class:`RoutingRecord` per batch (main layers and MTP modules)."""
        ...

    def loss(self, batches: list[Batch]) -> float:
        """The mean main loss per predicted token over ``batches``."""
        ...

    def biases(self) -> dict[int, torch.Tensor]:
        """The gates' biases by MoE layer."""
        ...

    def set_biases(self, biases: dict[int, torch.Tensor]) -> None:
        """Set the gates' biases of the layers named."""
        ...

    def close(self) -> None: ...


class LocalSource:
    """The local engine: a model in this process, its own experts (float32 unless the model is cast).

    Args:
        model: the model (e.g. :func:`~raymoe.platform.checkpoint.reader.load_model`), in eval mode.
        keep_scores: record the biased scores of every expert too.
        dtype: ``fp32``, or ``bf16`` for bf16 autocast (as training's mixed precision).
    """

    def __init__(self, model: DeepseekV3, keep_scores: bool = True, dtype: str = "fp32") -> None:
        self.model = model.eval()
        self.keep_scores = keep_scores
        self.device = model.device
        self.dtype = dtype

    @torch.no_grad()
    def record(self, batches: list[Batch]) -> list[RoutingRecord]:
        recorder = RoutingRecorder(self.model, self.keep_scores)
        out = []
        for input_ids, labels in batches:
            with autocast_context(self.dtype, self.device):
                forward.loss(self.model, input_ids.to(self.device), labels.to(self.device), RECORD_MTP_LAMBDA, recorder)
            out.append(recorder.record(input_ids, labels, self.model.cfg.num_hidden_layers))
        return out

    @torch.no_grad()
    def loss(self, batches: list[Batch]) -> float:
        total, count = 0.0, 0
        for input_ids, labels in batches:
            with autocast_context(self.dtype, self.device):
                out = forward.loss(self.model, input_ids.to(self.device), labels.to(self.device), mtp_lambda=0.0)
            total += out.main_loss.item() * out.tokens
            count += out.tokens
        return total / max(count, 1)

    def biases(self) -> dict[int, torch.Tensor]:
        return {layer: moe.gate.e_score_correction_bias.detach().float().cpu().clone()
                for layer, moe in self.model.moe_by_layer().items()}  # fmt: skip

    @torch.no_grad()
    def set_biases(self, biases: dict[int, torch.Tensor]) -> None:
        moe = self.model.moe_by_layer()
        for layer, b in biases.items():
            moe[layer].gate.e_score_correction_bias.copy_(b)

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- routing metrics


@dataclass
class LayerRows:
    """One layer's valid rows over a domain's records: chosen experts, gate weights, input and predicted tokens."""

    idx: torch.Tensor  # [N, K]
    weights: torch.Tensor  # [N, K]
    inputs: torch.Tensor  # [N]
    predicted: torch.Tensor | None  # [N]


def layer_rows(records: list[RoutingRecord], layer: int) -> LayerRows:
    """The valid rows of ``layer`` in ``records``, concatenated (see :meth:`RoutingRecord.tokens`)."""
    idx, weights, inputs, predicted = [], [], [], []
    for rec in records:
        r = rec.layers[layer]
        tok_in, tok_pred, valid = rec.tokens(layer)
        idx.append(r.idx[valid])
        weights.append(r.weights[valid])
        inputs.append(tok_in[valid])
        predicted.append(tok_pred[valid] if tok_pred is not None else None)
    has_pred = all(p is not None for p in predicted)
    return LayerRows(torch.cat(idx), torch.cat(weights), torch.cat(inputs), torch.cat(predicted) if has_pred else None)


def _balance(counts: torch.Tensor) -> dict[str, Any]:
    return {"load": counts.tolist(), "maxvio": m.max_vio(counts), "entropy": m.routing_entropy(counts),
            "effective_experts": m.effective_experts(counts)}  # fmt: skip


def _vocab(rows: LayerRows, tokens: torch.Tensor, E: int, min_count: int, top: int) -> dict[str, Any]:
    vocab, counts, spec = m.vocab_specialization(rows.idx, tokens, E)
    mean_max, top_tokens = m.vocab_summary(vocab, counts, spec, min_count, top)
    return {"mean_max_specialization": mean_max, "tokens": int((counts >= min_count).sum()),
            "top_tokens": {str(e): [list(t) for t in ts] for e, ts in top_tokens.items()}}  # fmt: skip


def routing_report(
    records: dict[str, list[RoutingRecord]], n_experts: int, min_count: int = 8, top_tokens: int = 8
) -> list[dict[str, Any]]:
    """Per MoE layer, over the records of every domain: load, MaxVio, entropy and effective experts (all
    domains and each), domain specialization, co-activation, vocabulary specialization (input and
    predicted tokens, tokens seen ``min_count`` times or more, the ``top_tokens`` best per expert) and
    each expert's mean gate weight when chosen. JSON-ready (lists and floats)."""
    first = next(iter(records.values()))[0]
    out = []
    for layer in first.layers:
        rows = {d: layer_rows(recs, layer) for d, recs in records.items()}
        counts = {d: m.expert_counts(r.idx, n_experts) for d, r in rows.items()}
        tokens = torch.tensor([float(r.idx.shape[0]) for r in rows.values()])
        spec = m.domain_specialization(torch.stack(list(counts.values())), tokens)
        every = LayerRows(torch.cat([r.idx for r in rows.values()]), torch.cat([r.weights for r in rows.values()]),
                          torch.cat([r.inputs for r in rows.values()]),
                          None if any(r.predicted is None for r in rows.values())
                          else torch.cat([r.predicted for r in rows.values()]))  # fmt: skip
        total = m.expert_counts(every.idx, n_experts)
        weight_sum = torch.zeros(n_experts, dtype=torch.float64).index_add_(
            0, every.idx.reshape(-1), every.weights.reshape(-1).double()
        )
        entry: dict[str, Any] = {
            "layer": layer, "name": layer_name(layer, first.num_hidden_layers), "tokens": int(every.idx.shape[0]),
            **_balance(total),
            "mean_gate_weight": (weight_sum / total.clamp_min(1)).tolist(),
            "domains": {d: {"tokens": int(tokens[i]), **_balance(counts[d])} for i, d in enumerate(rows)},
            "domain_specialization": {d: spec[i].tolist() for i, d in enumerate(rows)},
            "coactivation": m.coactivation(every.idx, n_experts).tolist(),
            "vocab": {"input": _vocab(every, every.inputs, n_experts, min_count, top_tokens)},
        }  # fmt: skip
        if every.predicted is not None:
            entry["vocab"]["predicted"] = _vocab(every, every.predicted, n_experts, min_count, top_tokens)
        out.append(entry)
    return out


def saturation_report(records_by_step: dict[int, list[RoutingRecord]]) -> dict[str, Any]:
    """Router saturation of every checkpoint (by step) against the last one, per layer and averaged.

    ``records_by_step``: the routing of the same batches at each checkpoint of one run."""
    steps = sorted(records_by_step)
    final = records_by_step[steps[-1]]
    layers = list(final[0].layers)
    names = [layer_name(layer, final[0].num_hidden_layers) for layer in layers]
    per_layer: dict[str, list[float]] = {name: [] for name in names}
    for step in steps:
        for layer, name in zip(layers, names):
            got = layer_rows(records_by_step[step], layer).idx
            want = layer_rows(final, layer).idx
            per_layer[name].append(m.router_saturation(got, want))
    mean = [sum(v[i] for v in per_layer.values()) / max(len(per_layer), 1) for i in range(len(steps))]
    return {"steps": steps, "final_step": steps[-1], "layers": per_layer, "mean": mean}


# --------------------------------------------------------------------------- the masking ablation


def ablation_ratios(requested: list[float], n_experts: int, limit: float) -> list[float]:
    """The ratios the ablation runs: 0 first, then those of ``requested`` up to ``limit`` (the others are skipped)."""
    kept = sorted({0.0, *[r for r in requested if 0 <= r <= limit + 1e-9]})
    skipped = [r for r in requested if r > limit + 1e-9]
    if skipped:
        logger.warning("masking ratios %s skipped: above %.3f some tokens would find no unmasked expert",
                       skipped, limit)  # fmt: skip
    return kept


def masking_ablation(
    source: RoutingSource,
    batches: dict[str, list[Batch]],
    loads: dict[str, dict[int, torch.Tensor]],
    ratios: list[float],
    n_experts: int,
    seed: int = 0,
    progress: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Mask each domain's most-routed experts (per layer, by ``loads[domain][layer]``) at each ratio, and
    as many random experts, and measure the main loss on every domain.

    The layers masked are those of ``loads``; the biases are restored at the end. Returns
    ``{"ratios", "masked_experts" (per ratio), "plain" {domain: loss}, "top" {mask domain: {domain:
    [loss per ratio]}}, "random" {domain: [loss per ratio]}}``; ratio 0 masks nothing."""
    base = source.biases()
    layers = sorted(next(iter(loads.values())))
    plain = {d: source.loss(b) for d, b in batches.items()}
    gen = torch.Generator().manual_seed(seed)
    cache: dict[tuple, dict[str, float]] = {}

    def run(masks: dict[int, list[int]]) -> dict[str, float]:
        key = tuple((layer, tuple(masks[layer])) for layer in layers)
        if key not in cache:
            source.set_biases({layer: m.masked_bias(base[layer], masks[layer]) for layer in layers})
            try:
                cache[key] = {d: source.loss(b) for d, b in batches.items()}
            finally:
                source.set_biases({layer: base[layer] for layer in layers})
            if progress is not None:
                progress()
        return cache[key]

    counts = [round(r * n_experts) for r in ratios]
    top: dict[str, dict[str, list[float]]] = {mask: {d: [] for d in batches} for mask in loads}
    rand: dict[str, list[float]] = {d: [] for d in batches}
    for n in counts:
        for mask, by_layer in loads.items():
            losses = run({layer: m.top_experts(by_layer[layer], n) for layer in layers})
            for d in batches:
                top[mask][d].append(losses[d])
        losses = run({layer: m.random_experts(n_experts, n, gen) for layer in layers})
        for d in batches:
            rand[d].append(losses[d])
    return {"ratios": list(ratios), "masked_experts": counts, "layers": layers, "plain": plain, "top": top,
            "random": rand}  # fmt: skip


def ablation_passes(ratios: list[float], n_domains: int) -> int:
    """How many masked settings :func:`masking_ablation` evaluates at most (for a progress bar)."""
    nonzero = sum(1 for r in ratios if r > 0)
    return 1 + nonzero * (n_domains + 1)
