"""One engine step over many sequences at once, as flat tensors (continuous batching).

Every sequence in a step contributes a run of consecutive tokens: a prefill chunk, one decode
token, or a decode token plus a speculative draft. The runs are concatenated into N flat rows, so
every matrix product of the model runs once over all of them; only attention needs to know which
row belongs to which sequence, and reads it from the run descriptions built here once per step and
shared by every layer (:class:`~raymoe.platform.model.attention.PagedAttention`):

- a run shorter than ``naive_min_run`` tokens takes the absorbed path over its own sequence's
  keys, at its own length (``absorbed_runs``; on CUDA the paged decode kernel through
  ``block_table``/``seq_lens``);
- a longer run (a prefill chunk) takes the naive path over its sequence's cached latents.

Either way a run names its keys as *segments*: (first slot, count) ranges of consecutive cache
slots, one per stretch of consecutive blocks. The allocator hands a request consecutive blocks
when it can (:class:`~raymoe.platform.inference.cache.BlockAllocator`), so a sequence's keys are
usually one segment, which attention reads as a view of the cache: nothing is padded to the
longest run and the cache is not copied. Only the compiled runner, whose one graph needs static
shapes, pads keys to the longest context (:meth:`StepBatch.padded_keys`).

A :class:`StepBatch` is plain tensors, ints and lists, so it crosses actors as one object.
Shape legend: N flat rows, A absorbed rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from raymoe.platform.model.attention import PagedAttention, Run


@dataclass
class SeqRun:
    """One sequence's part of a step: ``tokens`` at positions ``start .. start+len-1``, cache in ``blocks``."""

    tokens: list[int]
    start: int
    blocks: list[int]


def key_segments(blocks: list[int], tokens: int, block_size: int) -> list[tuple[int, int]]:
    """The cache slots of a sequence's first ``tokens`` tokens as (first slot, count) ranges of consecutive slots."""
    segments: list[tuple[int, int]] = []
    for i in range(-(-tokens // block_size)):
        count = min(block_size, tokens - i * block_size)
        slot = blocks[i] * block_size
        if segments and segments[-1][0] + segments[-1][1] == slot:
            segments[-1] = (segments[-1][0], segments[-1][1] + count)
        else:
            segments.append((slot, count))
    return segments


@dataclass
class StepBatch:
    """The flat form of a step's runs (see the module docstring)."""

    tokens: torch.Tensor  # [N] int64, the input token of each row
    positions: torch.Tensor  # [N] int64
    slots: torch.Tensor  # [N] int64, where each row's latent is written: block * block_size + row
    lengths: list[int]  # tokens per run (B runs)
    absorbed_rows: torch.Tensor | None  # [A] rows of the absorbed path; None: all of them
    absorbed_runs: list[Run]  # (first absorbed row, length, start, key segments) of each absorbed run
    block_table: torch.Tensor  # [A, max blocks] int32, each absorbed row's sequence's blocks (0 past its end)
    seq_lens: torch.Tensor  # [A] int32, position + 1 of each absorbed row
    block_size: int
    naive_runs: list[Run] = field(default_factory=list)  # (first row, length, start, key segments)

    @property
    def num_rows(self) -> int:
        return int(self.tokens.shape[0])

    def last_rows(self) -> torch.Tensor:
        """The flat row of each run's last token [B]."""
        return torch.tensor(self.lengths).cumsum(0) - 1

    def to(self, device: torch.device | str) -> StepBatch:
        return StepBatch(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.__dict__.items()})

    def padded_keys(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each absorbed row's keys padded to the longest: slots [A, T] (0, the padding block, past its
        end) and which it sees [A, T] bool. Only for a graph compiled to static shapes."""
        A = int(self.seq_lens.shape[0])
        T = int(self.seq_lens.max()) if A else 1
        key_slots = torch.zeros(A, T, dtype=torch.long)
        key_valid = torch.zeros(A, T, dtype=torch.bool)
        for first, length, start, segments in self.absorbed_runs:
            slots = torch.cat([torch.arange(s, s + n) for s, n in segments])  # [start + length]
            for i in range(length):
                key_slots[first + i, : start + i + 1] = slots[: start + i + 1]
                key_valid[first + i, : start + i + 1] = True
        return key_slots.to(self.tokens.device), key_valid.to(self.tokens.device)

    def attention(self, kv: torch.Tensor, layer_base: dict[int, int]) -> PagedAttention:
        """The attention context of this step over the cache ``kv`` [L * slots, C + R]."""
        return PagedAttention(
            kv=kv,
            layer_base=layer_base,
            positions=self.positions,
            slots=self.slots,
            absorbed_rows=self.absorbed_rows,
            absorbed_runs=self.absorbed_runs,
            block_table=self.block_table,
            seq_lens=self.seq_lens,
            block_size=self.block_size,
            naive_runs=self.naive_runs,
        )


def build_step(runs: list[SeqRun], block_size: int, naive_min_run: int | None = None) -> StepBatch:
    """The :class:`StepBatch` of ``runs`` (each non-empty, its blocks covering start + len tokens).

    Runs of at least ``naive_min_run`` tokens take the naive attention path (None: none do)."""
    if not runs:
        raise ValueError("a step needs at least one sequence")
    lengths = [len(r.tokens) for r in runs]
    if min(lengths) < 1:
        raise ValueError("every run of a step needs at least one token")
    tokens: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    absorbed_rows: list[int] = []
    absorbed: list[Run] = []
    naive: list[Run] = []
    tables: list[list[int]] = []
    seq_lens: list[int] = []
    row = 0
    for b, r in enumerate(runs):
        n, end = len(r.tokens), r.start + len(r.tokens)
        if len(r.blocks) * block_size < end:
            raise ValueError(f"sequence {b}: {len(r.blocks)} blocks cannot hold {end} tokens")
        tokens.extend(r.tokens)
        positions.extend(range(r.start, end))
        slots.extend(r.blocks[p // block_size] * block_size + p % block_size for p in range(r.start, end))
        segments = key_segments(r.blocks, end, block_size)
        if naive_min_run is not None and n >= naive_min_run:
            naive.append((row, n, r.start, segments))
        else:
            absorbed.append((len(absorbed_rows), n, r.start, segments))
            absorbed_rows.extend(range(row, row + n))
            used = r.blocks[: -(-end // block_size)]
            tables.extend([used] * n)
            seq_lens.extend(range(r.start + 1, end + 1))
        row += n
    max_blocks = max((len(t) for t in tables), default=1)
    block_table = torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables], dtype=torch.int32)
    return StepBatch(
        tokens=torch.tensor(tokens, dtype=torch.long),
        positions=torch.tensor(positions, dtype=torch.long),
        slots=torch.tensor(slots, dtype=torch.long),
        lengths=lengths,
        absorbed_rows=None if not naive else torch.tensor(absorbed_rows, dtype=torch.long),
        absorbed_runs=absorbed,
        block_table=block_table.view(len(tables), max_blocks),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_size=block_size,
        naive_runs=naive,
    )
