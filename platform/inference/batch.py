"""One engine step over many sequences at once, as flat tensors (continuous batching).

Every sequence in a step contributes a run of consecutive tokens: a prefill chunk, one decode
token, or a decode token plus a speculative draft. The runs are concatenated into N flat rows, so
every matrix product of the model runs once over all of them; only attention needs to know which
row belongs to which sequence, and reads it from the index tensors built here once per step and
shared by every layer (:class:`~raymoe.platform.model.attention.PagedAttention`):

- a run shorter than ``naive_min_run`` tokens takes the absorbed path: each of its rows attends
  over its own sequence's keys up to its position (``key_slots``/``key_valid``, or on CUDA the
  paged decode kernel through ``block_table``/``seq_lens``), so nothing is padded to the
  longest run;
- a longer run (a prefill chunk) takes the naive path over its sequence's cached latents.

A :class:`StepBatch` is plain tensors and ints, so it crosses actors as one object.
Shape legend: N flat rows, A absorbed rows, T the longest context among them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from raymoe.platform.model.attention import PagedAttention


@dataclass
class SeqRun:
    """One sequence's part of a step: ``tokens`` at positions ``start .. start+len-1``, cache in ``blocks``."""

    tokens: list[int]
    start: int
    blocks: list[int]


@dataclass
class StepBatch:
    """The flat form of a step's runs (see the module docstring)."""

    tokens: torch.Tensor  # [N] int64, the input token of each row
    positions: torch.Tensor  # [N] int64
    slots: torch.Tensor  # [N] int64, where each row's latent is written: block * block_size + row
    lengths: list[int]  # tokens per run (B runs)
    absorbed_rows: torch.Tensor | None  # [A] rows of the absorbed path; None: all of them
    key_slots: torch.Tensor  # [A, T] int64, cache slot of each absorbed row's keys (0, the padding block, past them)
    key_valid: torch.Tensor  # [A, T] bool, the keys each absorbed row sees (its sequence up to its position)
    block_table: torch.Tensor  # [A, max blocks] int32, each absorbed row's sequence's blocks (0 past its end)
    seq_lens: torch.Tensor  # [A] int32, position + 1 of each absorbed row
    block_size: int
    naive_runs: list[tuple[int, int, int, torch.Tensor]] = field(default_factory=list)  # (row, len, start, key slots)

    @property
    def num_rows(self) -> int:
        return int(self.tokens.shape[0])

    def last_rows(self) -> torch.Tensor:
        """The flat row of each run's last token [B]."""
        return torch.tensor(self.lengths).cumsum(0) - 1

    def to(self, device: torch.device | str) -> StepBatch:
        def move(v):  # noqa: ANN001, ANN202
            if isinstance(v, torch.Tensor):
                return v.to(device)
            if isinstance(v, list) and v and isinstance(v[0], tuple):
                return [(*run[:3], run[3].to(device)) for run in v]
            return v

        return StepBatch(**{k: move(v) for k, v in self.__dict__.items()})

    def attention(self, kv: torch.Tensor, layer_base: dict[int, int]) -> PagedAttention:
        """The attention context of this step over the cache ``kv`` [L * slots, C + R]."""
        return PagedAttention(
            kv=kv,
            layer_base=layer_base,
            positions=self.positions,
            slots=self.slots,
            absorbed_rows=self.absorbed_rows,
            key_slots=self.key_slots,
            key_valid=self.key_valid,
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
    absorbed: list[tuple[int, int, torch.Tensor, list[int]]] = []  # (row, position, sequence slots, blocks)
    naive: list[tuple[int, int, int, torch.Tensor]] = []
    row = 0
    for b, r in enumerate(runs):
        end = r.start + len(r.tokens)
        if len(r.blocks) * block_size < end:
            raise ValueError(f"sequence {b}: {len(r.blocks)} blocks cannot hold {end} tokens")
        table = torch.tensor(r.blocks, dtype=torch.long)
        pos = torch.arange(end)
        seq_slots = table[pos // block_size] * block_size + pos % block_size  # [end]
        tokens.extend(r.tokens)
        positions.extend(range(r.start, end))
        slots.extend(seq_slots[r.start :].tolist())
        if naive_min_run is not None and len(r.tokens) >= naive_min_run:
            naive.append((row, len(r.tokens), r.start, seq_slots))
        else:
            absorbed += [(row + i, r.start + i, seq_slots, r.blocks) for i in range(len(r.tokens))]
        row += len(r.tokens)
    T = max((p + 1 for _, p, _, _ in absorbed), default=1)
    A = len(absorbed)
    key_slots = torch.zeros(A, T, dtype=torch.long)
    key_valid = torch.zeros(A, T, dtype=torch.bool)
    max_blocks = max((len(blocks) for *_, blocks in absorbed), default=1)
    block_table = torch.zeros(A, max_blocks, dtype=torch.int32)
    for a, (_, p, seq_slots, blocks) in enumerate(absorbed):
        key_slots[a, : p + 1] = seq_slots[: p + 1]
        key_valid[a, : p + 1] = True
        block_table[a, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
    return StepBatch(
        tokens=torch.tensor(tokens, dtype=torch.long),
        positions=torch.tensor(positions, dtype=torch.long),
        slots=torch.tensor(slots, dtype=torch.long),
        lengths=lengths,
        absorbed_rows=None if not naive else torch.tensor([a[0] for a in absorbed], dtype=torch.long),
        key_slots=key_slots,
        key_valid=key_valid,
        block_table=block_table,
        seq_lens=torch.tensor([p + 1 for _, p, _, _ in absorbed], dtype=torch.int32),
        block_size=block_size,
        naive_runs=naive,
    )
