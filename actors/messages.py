"""What crosses actors of the graph: typed objects, one per Ray return value, never positional slots.

A stage call returns ``ep + 1`` values (Ray's ``num_returns``): one :class:`DispatchBuffer` per
expert shard (None when the stage finished) and one :class:`StageOutput` (None while it waits for
experts), so that each shard fetches only its own buffer. The driver keeps them as
:class:`StageRefs`, and the backward's ``ep + 2`` as :class:`BackwardRefs`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class DispatchBuffer:
    """One MoE layer's rows for one expert shard: each row once, with the experts it chose there.

    ``local_ids`` [n, K] index the shard's experts of the layer (-1: a choice on another shard,
    whose weight is 0); ``weights`` [n, K] are the gate's."""

    layer: int
    x: torch.Tensor  # [n, D], in the compute dtype
    local_ids: torch.Tensor
    weights: torch.Tensor


@dataclass
class ExpertGrads:
    """The backward of a shard's outputs for one buffer: gradients of its rows and of their gate weights."""

    x: torch.Tensor  # [n, D]
    weights: torch.Tensor  # [n, K]


@dataclass
class StageOutput:
    """What a stage's forward produced: hidden rows for the next stage, or the last stage's logits and rows."""

    hidden: torch.Tensor | None = None  # [N, D]
    logits: torch.Tensor | None = None  # [rows, V] float32 (serving)


@dataclass
class StageRefs:
    """A stage call's results as the driver holds them (object references, or values in process)."""

    buffers: list[Any]  # one per expert shard
    output: Any

    @classmethod
    def of(cls, refs: list) -> StageRefs:
        return cls(buffers=list(refs[:-1]), output=refs[-1])


@dataclass
class BackwardRefs:
    """A stage backward call's ``ep + 2`` results: per shard the gradient of its outputs (None when the
    stage's backward finished), then the gradient of the stage's input rows and of its MTP embeddings."""

    grads: list[Any]
    grad_hidden: Any
    grad_mtp: Any

    @classmethod
    def of(cls, refs: list) -> BackwardRefs:
        return cls(grads=list(refs[:-2]), grad_hidden=refs[-2], grad_mtp=refs[-1])


@dataclass
class TrainInput:
    """One micro-batch for every stage of a replica: its tokens, labels and loss scale."""

    input_ids: torch.Tensor  # [b, S]
    labels: torch.Tensor  # [b, S]
    scale: float = 1.0  # the loss is scaled by it (1 / micro-batches of the step)
    train: bool = True  # False: evaluation (main loss only, no graph kept)
    record: bool = False  # evaluation that records the routing (MTP modules included), returned by eval_result


@dataclass
class InferInput:
    """One serving step for a stage: the main model's layers (``kind`` "main") or the MTP draft ("mtp")."""

    kind: str
    batch: Any  # raymoe.platform.inference.batch.StepBatch
    logit_rows: torch.Tensor | None = None  # last stage: the rows whose logits are wanted
    hidden_rows: torch.Tensor | None = None  # last stage, main: the rows whose hidden states are wanted
