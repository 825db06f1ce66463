"""One engine step over many sequences at once, as flat tensors (continuous batching).

Every sequence in a step contributes a run of consecutive tokens: a prefill chunk, one decode
token, or a decode token plus a speculative draft. The runs are concatenated into N flat rows, so
every matrix product of the model runs once over all of them; only attention needs to know which
row belongs to which sequence, and reads that from the index tensors built here once per step and
shared by every layer. A :class:`StepBatch` is plain tensors, so it crosses actors as one object.

Shape legend: N flat rows, B sequences, S the longest run, T the longest context (cached + new).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
    q_index: torch.Tensor  # [B, S] int64, flat row of query (b, s); N (a zero row) where padding
    q_valid: torch.Tensor  # [B, S] bool
    k_slots: torch.Tensor  # [B, T] int64, cache slot of key t of sequence b (slot 0, the padding block, past its end)
    mask: torch.Tensor  # [B, S, T] bool, query (b, s) may attend to key t
    lengths: list[int]  # tokens per run (B)
    block_table: torch.Tensor  # [B, max blocks] int32, each sequence's blocks (0, the padding block, past its end)
    seq_lens: torch.Tensor  # [B] int32, each sequence's context after this step (start + run length)
    block_size: int

    @property
    def num_rows(self) -> int:
        return int(self.tokens.shape[0])

    def last_rows(self) -> torch.Tensor:
        """The flat row of each run's last token [B]."""
        return torch.tensor(self.lengths).cumsum(0) - 1

    def to(self, device: torch.device | str) -> StepBatch:
        return StepBatch(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()})


def build_step(runs: list[SeqRun], block_size: int) -> StepBatch:
    """The :class:`StepBatch` of ``runs`` (each non-empty, its blocks covering start + len tokens)."""
    if not runs:
        raise ValueError("a step needs at least one sequence")
    tokens: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    lengths = [len(r.tokens) for r in runs]
    if min(lengths) < 1:
        raise ValueError("every run of a step needs at least one token")
    S = max(lengths)
    T = max(r.start + len(r.tokens) for r in runs)
    B = len(runs)
    N = sum(lengths)
    q_index = torch.full((B, S), N, dtype=torch.long)
    k_slots = torch.zeros(B, T, dtype=torch.long)
    q_pos = torch.full((B, S), -1, dtype=torch.long)
    block_table = torch.zeros(B, max(len(r.blocks) for r in runs), dtype=torch.int32)
    row = 0
    for b, r in enumerate(runs):
        end = r.start + len(r.tokens)
        if len(r.blocks) * block_size < end:
            raise ValueError(f"sequence {b}: {len(r.blocks)} blocks cannot hold {end} tokens")
        table = torch.tensor(r.blocks, dtype=torch.long)
        pos = torch.arange(end)
        seq_slots = table[pos // block_size] * block_size + pos % block_size  # [end]
        k_slots[b, :end] = seq_slots
        block_table[b, : len(r.blocks)] = table.to(torch.int32)
        n = len(r.tokens)
        tokens.extend(r.tokens)
        positions.extend(range(r.start, end))
        slots.extend(seq_slots[r.start :].tolist())
        q_index[b, :n] = torch.arange(row, row + n)
        q_pos[b, :n] = torch.arange(r.start, end)
        row += n
    q_valid = q_pos >= 0
    # causal: key t is visible to the query at position p when t <= p; a padded query (p = -1)
    # sees key 0 only, so its softmax stays finite (its output is dropped)
    mask = torch.arange(T)[None, None, :] <= q_pos.clamp_min(0)[:, :, None]
    return StepBatch(
        tokens=torch.tensor(tokens, dtype=torch.long),
        positions=torch.tensor(positions, dtype=torch.long),
        slots=torch.tensor(slots, dtype=torch.long),
        q_index=q_index,
        q_valid=q_valid,
        k_slots=k_slots,
        mask=mask,
        lengths=lengths,
        block_table=block_table,
        seq_lens=torch.tensor([r.start + len(r.tokens) for r in runs], dtype=torch.int32),
        block_size=block_size,
    )
