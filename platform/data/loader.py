"""The resumable, data-parallel loader of a prepared corpus (see :mod:`raymoe.platform.data.prepare`).

Order: each epoch is a permutation of all sequences of the split, drawn by a ``torch.Generator``
seeded from (seed, epoch). Of a permutation, the first ``offset`` positions were consumed before a
resume on another world size (0 otherwise); the rest, cut to a multiple of ``world_size``, is dealt
round-robin: rank r takes positions ``offset + r, offset + r + world_size, …``, so all ranks take
equally many and together cover the epoch (the few left over are skipped in that epoch only). A
loader's position is (seed, epoch, offset, position): its :meth:`ShardLoader.state_dict`, which
resumes at the exact next sample, on the same or another world size. Shards are read on first use,
verified against the manifest's sha256 once, and kept as tensors. A data directory is a local path
or a URI (``s3://bucket/data``): shards are read through pyarrow filesystems.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from raymoe.platform.data.shards import DataError, Location, Manifest, read_manifest, read_shard

logger = logging.getLogger(__name__)

STATE_VERSION = 1
SEED_BITS = 63  # torch.Generator.manual_seed takes a 64-bit seed; keep it positive


def epoch_seed(seed: int, epoch: int) -> int:
    """The generator seed of ``epoch``: a hash of (seed, epoch), the same on every machine and Python."""
    digest = hashlib.sha256(f"raymoe-loader:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << SEED_BITS) - 1)


def epoch_permutation(num_sequences: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """The order of the split's sequences in ``epoch``: [N] long (``arange`` without ``shuffle``)."""
    if not shuffle:
        return torch.arange(num_sequences)
    return torch.randperm(num_sequences, generator=torch.Generator().manual_seed(epoch_seed(seed, epoch)))


class ShardStore:
    """The sequences of one split, read from its shards on demand and cached as tensors.

    Args:
        data_dir: a prepared data directory (``manifest.json`` and shards): a local path or a URI.
        split: ``"train"`` or ``"validation"``.
        max_cached_shards: decoded shards kept in memory (least recently used dropped first);
            None keeps them all (the whole split, 4 bytes a token).
    """

    def __init__(self, data_dir: Location, split: str = "train", max_cached_shards: int | None = None) -> None:
        self.data_dir = str(data_dir)  # a string, as storage locations are: Path would mangle s3://
        self.manifest: Manifest = read_manifest(self.data_dir)
        if split not in self.manifest.splits:
            raise DataError(f"{self.data_dir}: no split {split!r} (splits: {', '.join(self.manifest.splits)})")
        self.split = split
        self.shards = self.manifest.splits[split].shards
        self.seq_len = self.manifest.seq_len
        counts = [s.sequences for s in self.shards]
        self.shard_starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])  # [num_shards + 1]
        self.num_sequences = int(self.shard_starts[-1])
        if max_cached_shards is not None and max_cached_shards < 1:
            raise ValueError(f"max_cached_shards must be >= 1 or None, got {max_cached_shards}")
        self.max_cached_shards = max_cached_shards
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._verified: set[int] = set()

    def __len__(self) -> int:
        return self.num_sequences

    def shard(self, index: int) -> torch.Tensor:
        """The sequences of shard ``index``: [n, S + 1] int32 (checksum verified on its first read)."""
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        rows = read_shard(self.data_dir, self.shards[index], self.seq_len, verify=index not in self._verified)
        self._verified.add(index)
        self._cache[index] = rows
        if self.max_cached_shards is not None and len(self._cache) > self.max_cached_shards:
            self._cache.popitem(last=False)
        return rows

    def rows(self, indices: torch.Tensor) -> torch.Tensor:
        """Sequences by index within the split: indices [B] → [B, S + 1] int32, in the order given."""
        idx = indices.numpy().astype(np.int64)
        shard_of = np.searchsorted(self.shard_starts, idx, side="right") - 1  # [B]
        out = torch.empty(len(idx), self.seq_len + 1, dtype=torch.int32)
        for shard in np.unique(shard_of):
            where = np.flatnonzero(shard_of == shard)
            local = torch.from_numpy(idx[where] - self.shard_starts[shard])
            out[torch.from_numpy(where)] = self.shard(int(shard))[local]
        return out


def to_batch(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences [B, S + 1] → (input_ids [B, S] long, labels [B, S] long)."""
    rows = rows.long()
    return rows[:, :-1], rows[:, 1:]


class ShardLoader:
    """Batches of a split, in a deterministic order that a checkpoint can resume exactly.

    Args:
        data_dir: a prepared data directory: a local path or a URI.
        split: which split to read.
        batch_size: B, sequences per :meth:`next_batch` on this rank.
        seed: seed of the epoch permutations.
        rank, world_size: this data-parallel rank and how many there are.
        shuffle: permute every epoch (else the stored order).
        max_cached_shards: see :class:`ShardStore`.
    """

    def __init__(
        self,
        data_dir: Location,
        split: str = "train",
        *,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        max_cached_shards: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.store = ShardStore(data_dir, split, max_cached_shards)
        if len(self.store) < world_size:
            raise DataError(
                f"{data_dir}: split {split!r} has {len(self.store)} sequences, fewer than world_size {world_size}"
            )
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.epoch = 0
        self.offset = 0  # permutation positions consumed before a resume on another world size
        self.position = 0  # samples this rank has taken in this epoch, after ``offset``
        self._order: torch.Tensor | None = None  # this rank's sequence indices of the current epoch

    @property
    def samples_per_epoch(self) -> int:
        """Sequences this rank takes in the current epoch."""
        return (len(self.store) - self.offset) // self.world_size

    def _epoch_order(self) -> torch.Tensor:
        """This rank's sequence indices of the current epoch: [samples_per_epoch] long."""
        if self._order is None:
            perm = epoch_permutation(len(self.store), self.seed, self.epoch, self.shuffle)
            end = self.offset + self.samples_per_epoch * self.world_size
            self._order = perm[self.offset + self.rank : end : self.world_size]
        return self._order

    def next_indices(self) -> torch.Tensor:
        """The split indices of the next batch: [B] long; advances the position, across epochs."""
        parts, need = [], self.batch_size
        while need:
            if self.position >= self.samples_per_epoch:
                self.epoch, self.offset, self.position, self._order = self.epoch + 1, 0, 0, None
            take = self._epoch_order()[self.position : self.position + need]
            parts.append(take)
            self.position += len(take)
            need -= len(take)
        return torch.cat(parts)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids [B, S] long, labels [B, S] long) of the next B sequences."""
        return to_batch(self.store.rows(self.next_indices()))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """The position, JSON-serializable: resume with :meth:`load_state_dict`."""
        return {
            "version": STATE_VERSION,
            "split": self.store.split,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "epoch": self.epoch,
            "offset": self.offset,
            "position": self.position,
            "rank": self.rank,
            "world_size": self.world_size,
            "manifest_sha256": self.store.manifest.checksum,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the exact next sample of ``state`` (saved by any rank, on this or another world size).

        Raises :class:`DataError` if the state was saved on other data (another manifest) or another split.
        """
        if state.get("version") != STATE_VERSION:
            raise DataError(f"loader state version {state.get('version')}, this raymoe reads {STATE_VERSION}")
        if state["manifest_sha256"] != self.store.manifest.checksum:
            raise DataError(
                f"{self.store.data_dir}: the data differ from the data of the saved loader state (manifest sha256 "
                f"{self.store.manifest.checksum[:16]}… here, {state['manifest_sha256'][:16]}… saved); "
                "resume on the data directory the run started with"
            )
        if state["split"] != self.store.split or bool(state["shuffle"]) != self.shuffle:
            raise DataError(
                f"loader state is of split {state['split']!r} (shuffle {state['shuffle']}), "
                f"this loader reads {self.store.split!r} (shuffle {self.shuffle})"
            )
        self.seed, self.epoch, self._order = int(state["seed"]), int(state["epoch"]), None
        if int(state["world_size"]) == self.world_size:
            self.offset, self.position = int(state["offset"]), int(state["position"])
        else:  # the ranks took the same count in lockstep: the permutation's prefix up to here is consumed
            self.offset = int(state["offset"]) + int(state["position"]) * int(state["world_size"])
            self.position = 0
            logger.info(
                "loader resumes on world size %d (saved on %d) at epoch %d, position %d",
                self.world_size, state["world_size"], self.epoch, self.offset,
            )  # fmt: skip


def iter_batches(
    data: Location | ShardStore,
    split: str = "validation",
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The whole split once, in its stored order, for evaluation: (input_ids [b, S], labels [b, S]) long.

    ``data`` is a data directory (a local path or a URI), or a :class:`ShardStore` to reuse its cached
    shards (its own split is read then). Rank r of ``world_size`` takes sequences r, r + world_size, …
    (none dropped; counts may differ by one between ranks). The last batch may be smaller than ``batch_size``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    store = data if isinstance(data, ShardStore) else ShardStore(data, split)
    order = torch.arange(rank, len(store), world_size)
    for start in range(0, len(order), batch_size):
        yield to_batch(store.rows(order[start : start + batch_size]))
