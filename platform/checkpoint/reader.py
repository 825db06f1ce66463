"""Any checkpoint, read by raymoe's tensor names; a model, a part of it, or an actor's share, loaded from it.

:func:`open_checkpoint` takes a location (local path or URI: a training checkpoint, a training
output meaning its latest checkpoint, or a Hugging Face checkpoint) and returns a reader with
``model_config``, ``run_config`` (training checkpoints), ``state`` (trainer state of training
checkpoints), ``names()``, ``has(name)`` and ``read(names)``, in the names of
:mod:`raymoe.platform.checkpoint.layout` (routed experts one by one). :func:`load_into` fills
existing tensors from a reader a bounded batch at a time, so that a process holds its own tensors
and at most :data:`LOAD_BATCH_BYTES` more; :func:`load_model` builds the model (or a part) on the
meta device and fills it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from raymoe.platform.checkpoint.hf import HFCheckpoint
from raymoe.platform.checkpoint.layout import (
    OPTIMIZER_PREFIX,
    CheckpointError,
    expert_name,
    is_stacked_expert,
    optimizer_name,
    resolve,
)
from raymoe.platform.checkpoint.sharded import TrainingCheckpoint

LOAD_BATCH_BYTES = 256 * 2**20  # read at most this much before copying it into place

Reader = TrainingCheckpoint | HFCheckpoint  # or a DeltaCheckpoint over either (raymoe.platform.checkpoint.delta)


def open_checkpoint(location: str, strict_mtp: bool = False) -> Reader:
    """A reader of the checkpoint ``location`` means (see :func:`~raymoe.platform.checkpoint.layout.resolve`)."""
    resolved = resolve(location)
    if resolved.kind == "training":
        return TrainingCheckpoint(resolved.location)
    if resolved.kind == "delta":
        from raymoe.platform.checkpoint.delta import DeltaCheckpoint

        return DeltaCheckpoint(resolved.location)
    return HFCheckpoint(resolved.location, strict_mtp=strict_mtp)


@torch.no_grad()
def load_into(
    targets: dict[str, torch.Tensor],
    reader: Reader,
    expert_ids: dict[str, list[int]] | None = None,
    optional: Callable[[str], bool] | None = None,
) -> set[str]:
    """Copy checkpoint tensors into ``targets`` (name -> tensor, in place; dtype and device kept).

    A stacked expert target ``...experts.gate_up_proj`` [n, ...] (or its optimizer state) takes experts
    ``expert_ids[...experts.gate_up_proj]``
    (default 0..n-1) one by one. Names for which ``optional(name)`` holds may be absent (optimizer
    state); any other absent name is a CheckpointError naming it, raised before anything is copied.
    Returns the targets (names of ``targets``) that were absent in part or whole, and were not filled."""
    wanted: list[tuple[str, str, int | None]] = []  # (checkpoint name, target, row of it or None)
    for name, t in targets.items():
        base, kind = name, None
        if name.startswith(OPTIMIZER_PREFIX):
            base, _, kind = name[len(OPTIMIZER_PREFIX) :].rpartition(".")
        if not is_stacked_expert(base):
            wanted.append((name, name, None))
            continue
        ids = (expert_ids or {}).get(base, list(range(t.shape[0])) if t.ndim else [0])
        if t.ndim == 0:  # the AdamW step of stacked experts: equal for all, read from the first
            ids = ids[:1]
        for row, e in enumerate(ids):
            one = expert_name(base, e)
            wanted.append((optimizer_name(one, kind) if kind else one, name, row if t.ndim else None))
    absent = [w for w, _, _ in wanted if not reader.has(w)]
    missing = [w for w in absent if not (optional and optional(w))]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"checkpoint {reader.location} has no tensor {missing[0]}{more}")
    absent_set = set(absent)
    present = [w for w in wanted if w[0] not in absent_set]
    wrong = []
    for name, target, row in present:  # every shape from the headers, before any data is read or copied
        shape, file = reader.describe(name)
        dest = targets[target] if row is None else targets[target][row]
        if tuple(shape) != tuple(dest.shape):
            wrong.append(f"tensor {name} in {file} has shape {list(shape)}, the model's {list(dest.shape)}")
    if wrong:
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise CheckpointError(f"checkpoint {reader.location} does not fit the model: {wrong[0]}{more}")
    batch: list[tuple[str, str, int | None]] = []
    size = 0
    for item in present:
        target = targets[item[1]]
        size += (target[0] if item[2] is not None else target).numel() * 4
        batch.append(item)
        if size >= LOAD_BATCH_BYTES:
            _copy(reader, batch, targets)
            batch, size = [], 0
    _copy(reader, batch, targets)
    return {target for name, target, _ in wanted if name in absent_set}


def _copy(reader: Reader, batch: list[tuple[str, str, int | None]], targets: dict[str, torch.Tensor]) -> None:
    if not batch:
        return
    tensors = reader.read([name for name, _, _ in batch])
    for name, target, row in batch:
        dest = targets[target] if row is None else targets[target][row]
        src = tensors[name]
        if tuple(src.shape) != tuple(dest.shape):
            raise CheckpointError(
                f"tensor {name} of {reader.location} has shape {list(src.shape)}, the model's {list(dest.shape)}"
            )
        dest.copy_(src)


def load_model(
    location: str | Reader,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    layers: tuple[int, int] | None = None,
    routed_experts: bool = True,
    seq_aux_alpha: float = 0.0,
) -> Any:
    """The model of a checkpoint (or the part ``layers``), built empty on ``device`` and filled tensor by tensor.

    Parameters are ``dtype`` except the routers (float32); the gate biases are the checkpoint's.
    Returns a :class:`~raymoe.platform.model.transformer.DeepseekV3` in eval mode."""
    from raymoe.platform.model.transformer import DeepseekV3

    reader = open_checkpoint(location) if isinstance(location, str) else location
    model = DeepseekV3.empty(reader.model_config, seq_aux_alpha, layers, routed_experts, device=device, dtype=dtype)
    load_into(dict(model.state_dict()), reader)
    return model.eval()
