"""The absorbed-MLA latent cache in fixed-size blocks, and the allocator that hands blocks out.

Per layer the cache is one tensor [num_blocks, block_size, C + R]: each token's normalized latent
``c_kv`` (C = kv_lora_rank) and its rotated RoPE key ``k_pe`` (R = qk_rope_head_dim) side by side,
as FlashMLA lays it out. A sequence owns a list of blocks (its block table); token t of the
sequence lives in block ``table[t // block_size]`` at row ``t % block_size``. Memory is fixed when
the engine starts (``cache_tokens``): a request that cannot get its blocks waits, one that could
never fit is refused, and nothing is allocated in the decode loop.
"""

from __future__ import annotations

import torch


class CacheFullError(RuntimeError):
    """No free blocks for a request right now (it waits) or ever (it is refused)."""


class BlockAllocator:
    """``num_blocks`` cache blocks of ``block_size`` tokens, handed out consecutive where they can be.

    A request gets the lowest run of consecutive free blocks that holds it (first fit), so its keys
    are one range of cache slots that attention reads as a view; when no such run is free it gets
    the lowest free blocks, in order. Block 0 is never handed out: it is the padding target of
    gathers, so a padded index never reads another sequence's cache.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if num_blocks < 2:
            raise ValueError(f"the cache needs at least 2 blocks (one is padding), got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(1, num_blocks))  # ascending

    @property
    def capacity_blocks(self) -> int:
        """Blocks a sequence may ever hold (all but the padding block)."""
        return self.num_blocks - 1

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.capacity_blocks - len(self._free)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def can_allocate(self, tokens: int) -> bool:
        return self.blocks_for(tokens) <= len(self._free)

    def allocate(self, tokens: int) -> list[int]:
        """Blocks for ``tokens`` tokens (consecutive when a run of them is free); CacheFullError when too few are."""
        n = self.blocks_for(tokens)
        free = self._free
        if n > len(free):
            raise CacheFullError(f"{n} cache blocks needed, {len(free)} free")
        first = next((i for i in range(len(free) - n + 1) if free[i + n - 1] - free[i] == n - 1), None)
        if first is None:  # fragmented: the lowest free blocks
            blocks, self._free = free[:n], free[n:]
        else:
            blocks, self._free = free[first : first + n], free[:first] + free[first + n :]
        return blocks

    def free(self, blocks: list[int]) -> None:
        self._free = sorted(self._free + blocks)


class BlockCache:
    """The cache tensors of some layers (all of them in one process; a stage's own on the graph).

    Args:
        layers: the layer ids whose cache this holds (main layers, then MTP modules as
            ``num_hidden_layers + k``).
        num_blocks, block_size: the block pool (shared by every layer).
        width: C + R values per token.
        dtype, device: of the cache.
    """

    def __init__(
        self,
        layers: list[int],
        num_blocks: int,
        block_size: int,
        width: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.index = {layer: i for i, layer in enumerate(layers)}
        self.block_size = block_size
        self.kv = torch.zeros(len(layers), num_blocks, block_size, width, dtype=dtype, device=device)

        slots = num_blocks * block_size
        self.flat = self.kv.view(-1, width)  # [L * slots, C + R]: what attention indexes (writes land in kv)
        self.layer_base = {layer: i * slots for layer, i in self.index.items()}  # first slot of each layer

    def layer(self, layer_id: int) -> torch.Tensor:
        """The cache of one layer, flat over (block, row): [num_blocks * block_size, C + R] (a view)."""
        return self.kv[self.index[layer_id]].view(-1, self.kv.shape[-1])

    @property
    def bytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()
