"""Absorbed-MLA decode over a paged latent cache (interpreted) against the torch reference."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import assert_close, interpret  # noqa: F401

from raymoe.kernels.mla_decode import BLOCK_N, mla_decode, mla_decode_reference


def _paged(seq_lens: list[int], H: int, C: int, R: int, block_size: int, dtype: torch.dtype):  # noqa: ANN202
    """Random queries and a cache whose blocks are shuffled; unused table slots hold -1."""
    B = len(seq_lens)
    max_blocks = max(-(-n // block_size) for n in seq_lens) + 1
    num_blocks = B * max_blocks + 3
    cache = torch.randn(num_blocks, block_size, C + R).to(dtype)
    perm = torch.randperm(num_blocks).to(torch.int32)
    table = torch.full((B, max_blocks), -1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(seq_lens):
        k = -(-n // block_size)
        table[b, :k] = perm[used : used + k]
        used += k
    q_lat = torch.randn(B, H, C).to(dtype)
    q_pe = torch.randn(B, H, R).to(dtype)
    return q_lat, q_pe, cache, table, torch.tensor(seq_lens, dtype=torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "seq_lens,H,C,R,block_size,num_splits",
    [
        ([1], 1, 24, 8, 16, 1),  # batch of one, one token, one head
        ([5, 77, 1, 140], 5, 40, 12, 16, 1),  # variable lengths, not multiples of the blocks
        ([5, 77, 1, 140], 37, 40, 12, 7, 3),  # more heads than one head block, odd page size, split
        ([2 * BLOCK_N + 9, 3], 3, 20, 4, 32, 4),  # splits of which some are empty for the short one
    ],
)
def test_matches_reference(
    seq_lens: list[int], H: int, C: int, R: int, block_size: int, num_splits: int, dtype: torch.dtype
) -> None:
    q_lat, q_pe, cache, table, lens = _paged(seq_lens, H, C, R, block_size, dtype)
    scale = (C + R) ** -0.5
    out = mla_decode(q_lat, q_pe, cache, table, lens, scale, num_splits=num_splits)
    assert out.dtype == dtype and out.shape == q_lat.shape
    expected = mla_decode_reference(q_lat, q_pe, cache, table, lens, scale)
    assert_close(out, expected, dtype, "mla decode")


def test_reference_is_attention_over_the_sequence() -> None:
    """The reference against a direct softmax over one sequence's tokens, read block by block."""
    q_lat, q_pe, cache, table, lens = _paged([11], 2, 8, 4, 4, torch.float64)
    tokens = torch.cat([cache[int(p)] for p in table[0, :3]])[:11]  # [11, C + R]
    scores = (q_lat[0] @ tokens[:, :8].T + q_pe[0] @ tokens[:, 8:].T) * 0.3
    expected = scores.softmax(-1) @ tokens[:, :8]
    out = mla_decode_reference(q_lat.float(), q_pe.float(), cache.float(), table, lens, 0.3)
    assert_close(out[0], expected, torch.float32)


def test_only_the_first_seq_len_tokens_count() -> None:
    q_lat, q_pe, cache, table, lens = _paged([9, 20], 4, 16, 8, 8, torch.float32)
    out = mla_decode(q_lat, q_pe, cache, table, lens, 0.2, num_splits=1)
    poisoned = cache.clone()
    poisoned[table[0, 1].long(), 1:] = 1e4  # tokens 9.. of sequence 0: past its length
    again = mla_decode(q_lat, q_pe, poisoned, table, lens, 0.2, num_splits=1)
    assert torch.equal(out[0], again[0])


def test_launcher_names_bad_arguments() -> None:
    q_lat, q_pe, cache, table, lens = _paged([3, 4], 2, 16, 8, 4, torch.float32)
    with pytest.raises(ValueError, match="cache's last dim must be C \\+ R"):
        mla_decode(q_lat, q_pe, cache[..., :-1].contiguous(), table, lens, 1.0)
    with pytest.raises(ValueError, match="block_table must be one of"):
        mla_decode(q_lat, q_pe, cache, table.long(), lens, 1.0)
    with pytest.raises(ValueError, match="q_lat must be contiguous"):
        mla_decode(q_lat.transpose(0, 1).contiguous().transpose(0, 1), q_pe, cache, table, lens, 1.0)
    with pytest.raises(ValueError, match="seq_lens must have B=2 rows"):
        mla_decode(q_lat, q_pe, cache, table, lens[:1], 1.0)
