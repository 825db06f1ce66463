"""Delta checkpoints: only the tensors a fine-tune changed, read back over the checkpoint it started from.

A delta is a directory with ``delta.json`` (``format``, the ``base`` location, the changed tensor
names, the method), ``delta.safetensors`` (those tensors, in raymoe's names: routed experts one by
one, so that ESFT's delta holds only its trained experts), the base's ``config.json`` and the
tokenizer. :class:`DeltaCheckpoint` is a reader like the others (:mod:`raymoe.platform.checkpoint.reader`):
a name the delta holds is read from it, every other from the base, so that anything that loads a
checkpoint (``load_model``, the actors, ``raymoe serve``, ``raymoe analyze``) loads a delta. Its
shapes are checked against the base's when it is opened.

:func:`write_delta` compares a fine-tuned checkpoint with its base tensor by tensor (bit for bit) a
bounded batch at a time and writes the ones that differ.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from raymoe.platform import storage
from raymoe.platform.checkpoint.layout import (
    CONFIG_FILE,
    DELTA_FILE,
    OPTIMIZER_PREFIX,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    CheckpointError,
)
from raymoe.platform.checkpoint.tensorfile import TensorFile, write_tensors

DELTA_TENSORS = "delta.safetensors"
DELTA_FORMAT = "raymoe-delta-1"
COMPARE_BATCH_BYTES = 256 * 2**20


class DeltaCheckpoint:
    """A delta over its base: the base's model, names and tensors, the changed ones from the delta."""

    kind = "delta"

    def __init__(self, location: str) -> None:
        from raymoe.platform.checkpoint.reader import open_checkpoint

        self.location = str(location)
        try:
            meta = storage.read_json(storage.join(self.location, DELTA_FILE))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read {storage.join(self.location, DELTA_FILE)}: {exc}") from None
        if meta.get("format") != DELTA_FORMAT:
            raise CheckpointError(
                f"{self.location}/{DELTA_FILE} has format {meta.get('format')!r}, expected {DELTA_FORMAT}"
            )
        self.meta = meta
        try:
            self.base = open_checkpoint(meta["base"])
        except CheckpointError as exc:
            raise CheckpointError(f"delta {self.location}: its base {meta['base']} cannot be opened: {exc}") from None
        self.file = TensorFile(storage.join(self.location, DELTA_TENSORS))
        self.changed = set(self.file.tensors)
        self.model_config = self.base.model_config
        self.run_config = getattr(self.base, "run_config", None)
        self.state = None  # not a training checkpoint: nothing to resume
        wrong = []
        for name in sorted(self.changed):
            if not self.base.has(name):
                wrong.append(f"{name} is not in the base")
            elif tuple(self.base.describe(name)[0]) != tuple(self.file.tensors[name].shape):
                wrong.append(f"{name} has shape {list(self.file.tensors[name].shape)}, the base's "
                             f"{list(self.base.describe(name)[0])}")  # fmt: skip
        if wrong:
            raise CheckpointError(f"delta {self.location} does not fit its base {meta['base']}: {wrong[0]}")

    def names(self) -> list[str]:
        return self.base.names()

    def has(self, name: str) -> bool:
        return name in self.changed or self.base.has(name)

    def describe(self, name: str) -> tuple[tuple[int, ...], str]:
        if name in self.changed:
            return tuple(self.file.tensors[name].shape), DELTA_TENSORS
        return self.base.describe(name)

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        names = list(names)
        mine = [n for n in names if n in self.changed]
        out = self.file.read(mine) if mine else {}
        rest = [n for n in names if n not in self.changed]
        if rest:
            out.update(self.base.read(rest))
        return out


def _model_names(reader: Any) -> list[str]:
    return [n for n in reader.names() if not n.startswith(OPTIMIZER_PREFIX)]


def changed_tensors(tuned: Any, base: Any) -> list[str]:
    """The model tensors (no optimizer state) of ``tuned`` that differ from ``base``'s, bit for bit."""
    names = _model_names(tuned)
    absent = [n for n in names if not base.has(n)]
    if absent:
        raise CheckpointError(f"{tuned.location} has tensors its base {base.location} lacks, e.g. {absent[0]}")
    changed, batch, size = [], [], 0

    def compare(batch: list[str]) -> None:
        a, b = tuned.read(batch), base.read(batch)
        changed.extend(n for n in batch if a[n].dtype != b[n].dtype or not torch.equal(a[n], b[n]))

    for name in names:
        batch.append(name)
        size += 4 * int(torch.Size(tuned.describe(name)[0]).numel())
        if size >= COMPARE_BATCH_BYTES:
            compare(batch)
            batch, size = [], 0
    if batch:
        compare(batch)
    return changed


def write_delta(tuned_location: str, base_location: str, out: str, extra: dict[str, Any] | None = None) -> dict:
    """Write the delta of the fine-tuned checkpoint ``tuned_location`` over ``base_location`` into ``out``.

    Returns its ``delta.json`` contents (with ``bytes``: the size of ``delta.safetensors``)."""
    from raymoe.platform.checkpoint.reader import open_checkpoint

    tuned, base = open_checkpoint(tuned_location), open_checkpoint(base_location)
    names = changed_tensors(tuned, base)
    storage.make_dirs(out)
    tensors = tuned.read(names) if names else {}
    write_tensors(storage.join(out, DELTA_TENSORS), tensors)
    for file in (CONFIG_FILE, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE):
        source = storage.join(tuned.location, file)
        if storage.is_file(source):
            storage.write_bytes(storage.join(out, file), storage.read_bytes(source))
    meta = {"format": DELTA_FORMAT, "base": str(base.location), "tuned": str(tuned.location), "changed": names,
            **(extra or {})}  # fmt: skip
    storage.write_json(storage.join(out, DELTA_FILE), meta)
    written = TensorFile(storage.join(out, DELTA_TENSORS))
    return {**meta, "bytes": written.data_start + sum(i.nbytes for i in written.tensors.values())}
