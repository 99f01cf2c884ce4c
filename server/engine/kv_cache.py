"""A paged KV cache sized from a byte budget, with a block allocator.

Why paged (block tables, `block_size` tokens per block) rather than one slot of `max_model_len` per
sequence:
- memory goes to the tokens that exist: a 20-token chat and a 4k-token document share one pool, so
  many more sequences fit in the same budget than with worst-case reservations (continuous batching
  lives on that);
- admission, growth, preemption and abort are block counts on a free list: O(1), no compaction, no
  fragmentation beyond the last partial block of each sequence;
- the model only needs a `slot_mapping` (where to write each new token) and a block table per
  sequence (where to read its context), which is also what Triton paged-attention kernels consume.

Layout: one K and one V tensor per layer, flat over slots: `K_i [num_blocks * block_size, Hkv, qk_dim_i]`
and `V_i [num_blocks * block_size, Hkv, v_dim_i]` (K and V have different head dims after compression).
Slot `s` is token `s % block_size` of block `s // block_size`. Block 0 is reserved as a scratch block:
padding rows of a CUDA-graph batch write there and read it, so no real sequence is ever touched.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def bytes_per_token(kv_shapes: list[tuple[int, int, int]], dtype: torch.dtype) -> int:
    """KV bytes one token costs: sum over layers of `Hkv * (qk_dim + v_dim) * dtype_size`."""
    size = torch.empty((), dtype=dtype).element_size()
    return sum(h * (dk + dv) for h, dk, dv in kv_shapes) * size


class BlockAllocator:
    """Free list over blocks `1..num_blocks-1` (block 0 is scratch) and per-sequence block lists."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 2:
            raise ValueError("the KV cache budget holds fewer than 2 blocks (1 usable)")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_blocks: list[int] = list(range(num_blocks - 1, 0, -1))  # pop() gives low ids first
        self.tables: dict[str, list[int]] = {}

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    def extra_blocks_needed(self, seq_id: str, num_tokens: int) -> int:
        """Blocks to add so `seq_id` holds `num_tokens` tokens."""
        return max(0, self.blocks_for(num_tokens) - len(self.tables.get(seq_id, ())))

    def holds(self, seq_id: str, num_tokens: int) -> bool:
        """Whether `seq_id`'s blocks already have room for `num_tokens` tokens (no growth needed): the
        scheduler's per-step check for every decoding sequence, so one dict lookup."""
        table = self.tables.get(seq_id)
        return table is not None and num_tokens <= len(table) * self.block_size

    def can_grow(self, seq_id: str, num_tokens: int) -> bool:
        return self.extra_blocks_needed(seq_id, num_tokens) <= len(self.free_blocks)

    def grow(self, seq_id: str, num_tokens: int) -> list[int]:
        """Ensure `seq_id` has room for `num_tokens` tokens; returns its block table."""
        need = self.extra_blocks_needed(seq_id, num_tokens)
        if need > len(self.free_blocks):
            raise RuntimeError(f"KV cache out of blocks: need {need}, free {len(self.free_blocks)}")
        table = self.tables.setdefault(seq_id, [])
        for _ in range(need):
            table.append(self.free_blocks.pop())
        return table

    def free(self, seq_id: str) -> int:
        """Return all blocks of `seq_id` to the free list; returns how many were freed."""
        table = self.tables.pop(seq_id, [])
        self.free_blocks.extend(reversed(table))
        return len(table)

    def table(self, seq_id: str) -> list[int]:
        return self.tables.get(seq_id, [])

    def slot(self, seq_id: str, pos: int) -> int:
        t = self.tables[seq_id]
        return t[pos // self.block_size] * self.block_size + pos % self.block_size

    def usage(self) -> float:
        """Fraction of usable blocks in use (0..1): the `vllm:kv_cache_usage_perc` metric."""
        return 1.0 - len(self.free_blocks) / self.num_usable_blocks


class PagedKVCache:
    """The per-layer cache tensors of one model plus its allocator."""

    def __init__(self, kv_shapes: list[tuple[int, int, int]], budget_bytes: int, block_size: int = 16,
                 device="cpu", dtype=torch.float16, max_blocks: int | None = None):
        self.kv_shapes = list(kv_shapes)
        self.block_size = block_size
        self.dtype = dtype
        self.bytes_per_token = bytes_per_token(self.kv_shapes, dtype)
        self.bytes_per_block = self.bytes_per_token * block_size
        num_blocks = int(budget_bytes) // max(self.bytes_per_block, 1)
        if max_blocks is not None:
            num_blocks = min(num_blocks, max_blocks)
        self.allocator = BlockAllocator(num_blocks, block_size)
        n = num_blocks * block_size
        self.caches: list[tuple[Tensor, Tensor]] = [
            (torch.zeros(n, h, dk, device=device, dtype=dtype), torch.zeros(n, h, dv, device=device, dtype=dtype))
            for h, dk, dv in self.kv_shapes
        ]

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def capacity_tokens(self) -> int:
        """Tokens that fit (scratch block excluded)."""
        return self.allocator.num_usable_blocks * self.block_size

    def max_sequences(self, seq_len: int) -> int:
        """How many sequences of `seq_len` tokens fit at once."""
        return self.allocator.num_usable_blocks // self.allocator.blocks_for(max(seq_len, 1))

    def usage(self) -> float:
        return self.allocator.usage()

    @staticmethod
    def tokens_for_budget(kv_shapes, budget_bytes: int, dtype: torch.dtype, block_size: int = 16) -> int:
        """Tokens a budget would hold for this model (without allocating)."""
        per_block = bytes_per_token(kv_shapes, dtype) * block_size
        return max(int(budget_bytes) // per_block - 1, 0) * block_size
