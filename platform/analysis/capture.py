"""Routing capture: what the gates chose in one forward, seen from the one place routing happens.

A :class:`RoutingRecorder` is the forward's :class:`~raymoe.platform.model.forward.Hooks`: the
program calls its ``route`` at every MoE layer with the gate's choice (the same tensors the
experts then run on) and its ``head`` with the logits of each depth. It keeps, per MoE layer (main
layers and MTP modules), the chosen expert ids, their gate weights and the biased scores
(affinity + bias, :func:`~raymoe.platform.model.moe.biased_scores`: what the choice ranked), and
the argmax token of each depth. Nothing is copied or moved while the forward runs (the tensors
are only referenced); :meth:`RoutingRecorder.take` moves them to the CPU at the end. Routing is
off unless a recorder is passed: the default hooks do nothing.

The local engine passes a recorder to :func:`~raymoe.platform.model.forward.loss`; on the actor
graph every attention stage (where the gates run) records its own layers and returns them with
the step's results (``raymoe.actors``); :func:`merge_parts` joins them. Either way one forward
gives a :class:`RoutingRecord`, the input of :mod:`raymoe.platform.analysis.metrics`.

Shape legend: B sequences of S tokens, N = B·S rows (sequence-major), K experts per token, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from raymoe.platform.model.forward import IGNORE_INDEX, Hooks, mtp_input_tokens, mtp_targets
from raymoe.platform.model.moe import biased_scores
from raymoe.platform.model.transformer import DeepseekV3


@dataclass
class LayerRouting:
    """One MoE layer's routing of N rows."""

    idx: torch.Tensor  # [N, K] int64: the chosen experts
    weights: torch.Tensor  # [N, K] float32: their gate weights (normalized, scaled)
    biased: torch.Tensor | None = None  # [N, E] float32: affinity + bias of every expert (None: not kept)

    def cpu(self) -> LayerRouting:
        return LayerRouting(self.idx.cpu(), self.weights.cpu(), None if self.biased is None else self.biased.cpu())


@dataclass
class RoutingRecord:
    """The routing of one forward over ``input_ids`` [B, S] (labels [B, S], next tokens, -100 = ignored).

    ``layers`` maps a MoE layer id (an MTP module k, 0-based, is ``num_hidden_layers + k``) to its
    :class:`LayerRouting`; ``predicted`` maps a depth (0: the main model, d: MTP depth d) to the
    argmax token of every row [N]."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    num_hidden_layers: int
    layers: dict[int, LayerRouting] = field(default_factory=dict)
    predicted: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return self.input_ids.numel()

    def depth(self, layer: int) -> int:
        """0 for a main layer, d for MTP depth d (layer ``num_hidden_layers + d - 1``)."""
        return 0 if layer < self.num_hidden_layers else layer - self.num_hidden_layers + 1

    def tokens(self, layer: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """What ``layer`` saw and predicted, row by row: (input tokens [N], predicted tokens [N] or None, valid [N]).

        A main layer's input token is the row's own; MTP depth d's is the token its module embeds,
        t_{i+d} = labels[i+d-1], and its rows are valid where its target t_{i+d+1} exists."""
        d = self.depth(layer)
        if d == 0:
            inputs = self.input_ids.reshape(-1)
            valid = torch.ones_like(inputs, dtype=torch.bool)
        else:
            inputs = mtp_input_tokens(self.labels, d).reshape(-1)
            valid = (mtp_targets(self.labels, d) != IGNORE_INDEX).reshape(-1)
        return inputs, self.predicted.get(d), valid


class RoutingRecorder(Hooks):
    """Forward hooks that record the routing of the MoE layers of ``part`` (a model, or an actor's part of it).

    Args:
        part: the model whose gates' biases make the biased scores.
        keep_scores: keep the biased scores of every expert [N, E] (False: ids and weights only).
    """

    def __init__(self, part: DeepseekV3, keep_scores: bool = True) -> None:
        self.bias = {layer: moe.gate.e_score_correction_bias for layer, moe in part.moe_by_layer().items()}
        self.keep_scores = keep_scores
        self.layers: dict[int, LayerRouting] = {}
        self.predictions: dict[int, torch.Tensor] = {}

    def route(self, layer: int, idx: torch.Tensor, weights: torch.Tensor, scores: torch.Tensor) -> None:
        bias = self.bias.get(layer)
        if bias is None:
            return
        biased = biased_scores(scores.detach(), bias) if self.keep_scores else None
        self.layers[layer] = LayerRouting(idx.detach(), weights.detach(), biased)

    wants_predictions = True

    def predicted(self, depth: int, tokens: torch.Tensor) -> None:
        self.predictions[depth] = tokens

    def take(self) -> tuple[dict[int, LayerRouting], dict[int, torch.Tensor]]:
        """What was recorded since the last call, on the CPU: (routing by layer, predicted tokens by depth)."""
        layers = {layer: r.cpu() for layer, r in self.layers.items()}
        predicted = {d: p.cpu() for d, p in self.predictions.items()}
        self.layers, self.predictions = {}, {}
        return layers, predicted

    def record(self, input_ids: torch.Tensor, labels: torch.Tensor, num_hidden_layers: int) -> RoutingRecord:
        """:meth:`take` as the :class:`RoutingRecord` of the forward over ``input_ids``/``labels``."""
        layers, predicted = self.take()
        return RoutingRecord(input_ids.cpu(), labels.cpu(), num_hidden_layers, layers, predicted)


def merge_parts(
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    num_hidden_layers: int,
    parts: list[tuple[dict[int, LayerRouting], dict[int, torch.Tensor]]],
) -> RoutingRecord:
    """One forward's record from the pieces its parts took (the actor graph: one per attention stage)."""
    record = RoutingRecord(input_ids.cpu(), labels.cpu(), num_hidden_layers)
    for layers, predicted in parts:
        record.layers.update(layers)
        record.predicted.update(predicted)
    record.layers = dict(sorted(record.layers.items()))
    return record
