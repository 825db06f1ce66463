"""Attention at each run's own length: key segments, consecutive blocks, views of the cache, and the
per-run path against the padded one (the compiled runner's form) and the whole-sequence forward."""

from __future__ import annotations

import pytest
import torch

from raymoe.platform.inference.batch import SeqRun, build_step, key_segments
from raymoe.platform.inference.cache import BlockAllocator, CacheFullError
from raymoe.platform.inference.runner import LocalRunner
from raymoe.platform.model import DeepseekV3
from raymoe.platform.model.attention import PagedAttention

from conftest import tiny_variant

BLOCK = 4


def test_key_segments_merge_consecutive_blocks_and_stop_at_the_last_token() -> None:
    assert key_segments([3, 4, 5], 10, BLOCK) == [(12, 10)]  # one range: slots 12..21
    assert key_segments([3, 4, 9, 10], 14, BLOCK) == [(12, 8), (36, 6)]
    assert key_segments([7, 2], 5, BLOCK) == [(28, 4), (8, 1)]  # out of order: one segment per block
    assert key_segments([5, 6, 7], 1, BLOCK) == [(20, 1)]  # only the blocks the tokens use


def test_the_allocator_hands_out_consecutive_blocks_first_fit() -> None:
    alloc = BlockAllocator(num_blocks=12, block_size=BLOCK)  # blocks 1..11
    a, b, c = alloc.allocate(8), alloc.allocate(12), alloc.allocate(4)
    assert (a, b, c) == ([1, 2], [3, 4, 5], [6])
    alloc.free(a)
    assert alloc.allocate(12) == [7, 8, 9]  # blocks 1, 2 are too few: the next run that fits
    assert alloc.allocate(4) == [1]  # the lowest run that holds one block
    alloc.free(b)  # free: 2, 3, 4, 5, 10, 11
    assert alloc.allocate(16) == [2, 3, 4, 5]
    alloc.free([3, 5])  # free: 3, 5, 10, 11; no run of 3
    assert alloc.allocate(12) == [3, 5, 10]  # fragmented: the lowest free blocks
    assert alloc.free_blocks == 1 and alloc.used_blocks == 10
    with pytest.raises(CacheFullError, match="2 cache blocks needed, 1 free"):
        alloc.allocate(5)


def test_a_run_of_one_segment_reads_a_view_of_the_cache() -> None:
    kv = torch.randn(3 * 8 * BLOCK, 6)  # three layers of 8 blocks
    base = {0: 0, 1: 32, 2: 64}
    step = build_step([SeqRun([1], 9, [2, 3, 4]), SeqRun([1], 5, [6, 1])], BLOCK)
    ctx = step.attention(kv, base)
    (_, _, _, one), (_, _, _, two) = ctx.absorbed_runs
    assert one == [(8, 10)] and len(two) == 2
    keys = ctx.keys(one, base[1])
    assert keys.data_ptr() == kv[32 + 8].data_ptr() and keys.shape == (10, 6)  # a view, no copy
    assert torch.equal(ctx.keys(two, base[2]), torch.cat((kv[64 + 24 : 64 + 28], kv[64 + 4 : 64 + 6])))


def _decode(model: DeepseekV3, ids: torch.Tensor, lengths: list[int], tables: list[list[int]], padded: bool):
    """Prefill each sequence to its length (naive), then two steps of runs of 1 and 2 tokens (absorbed) at
    mixed lengths; the logits of the absorbed steps, by the per-run path or with keys padded to the longest."""
    runner = LocalRunner(model, num_blocks=1 + max(max(t) for t in tables), block_size=BLOCK)
    for b, n in enumerate(lengths):
        runner.main(build_step([SeqRun(ids[b, :n].tolist(), 0, tables[b])], BLOCK, 1), torch.tensor([n - 1]))
    outs = []
    starts = list(lengths)
    for width in (1, 2):  # a decode token; a token and its draft (causal within the run)
        runs = [SeqRun(ids[b, s : s + width].tolist(), s, tables[b]) for b, s in enumerate(starts)]
        batch = build_step(runs, BLOCK, naive_min_run=3)
        rows = torch.arange(batch.num_rows)
        if padded:  # the compiled runner's form, run eagerly
            key_slots, key_valid = batch.padded_keys()
            ctx = PagedAttention(
                kv=runner.cache.flat, layer_base=runner.cache.layer_base, positions=batch.positions,
                slots=batch.slots, absorbed_rows=None, absorbed_runs=[], block_table=batch.block_table,
                seq_lens=batch.seq_lens, block_size=BLOCK, key_slots=key_slots, key_valid=key_valid,
            )  # fmt: skip
            from raymoe.platform.model.forward import drive, head, main_program

            with torch.inference_mode():
                h = drive(main_program(model, ctx, tokens=batch.tokens), runner._experts)
                outs.append(head(model, h))
        else:
            outs.append(runner.main(batch, rows)[0])
        starts = [s + width for s in starts]
    return outs


def test_per_run_attention_equals_padded_and_the_whole_sequence_forward() -> None:
    cfg = tiny_variant()
    model = DeepseekV3(cfg).double().eval()
    model.init_weights(torch.Generator().manual_seed(5))
    lengths = [3, 17, 9]  # mixed contexts: the padded form pads two of three rows
    ids = torch.randint(0, cfg.vocab_size, (3, 20))
    # consecutive blocks (one segment), out of order (a segment per block), and split in two
    tables = [[1, 2], [3, 4, 5, 6, 7], [12, 11, 9, 10]]
    per_run = _decode(model, ids, lengths, tables, padded=False)
    padded = _decode(model, ids, lengths, tables, padded=True)
    for a, b in zip(per_run, padded):
        assert (a - b).abs().max().item() <= 1e-6  # float64 model, float32 logits
    with torch.no_grad():
        full = model(ids)  # [3, 20, V]
    expected = [torch.stack([full[b, n] for b, n in enumerate(lengths)]),
                torch.cat([full[b, n + 1 : n + 3] for b, n in enumerate(lengths)])]  # fmt: skip
    for got, want in zip(per_run, expected):
        assert (got - want).abs().max().item() <= 1e-5
