"""Paged KV cache: a fixed pool of blocks, a block table per sequence, a hard memory cap.

The cache is written by absolute position, so truncating a sequence to any committed length is
O(1) (its length is lowered and whole blocks past the end go back to the pool). Allocation
failure is a typed `NoRoom` result, never an exception or a crash.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class NoRoom:
    """Allocation failed: `needed` blocks were wanted, `free` were left."""

    needed: int
    free: int


@dataclass
class SequenceBlocks:
    block_ids: list[int] = field(default_factory=list)
    num_tokens: int = 0  # positions holding valid (committed) KV
    last_used: float = field(default_factory=time.monotonic)


class PagedKVCache:
    """K and V pools `[num_layers, num_blocks, block_size, num_kv_heads, head_dim]` + tables."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                 num_blocks: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._seqs: OrderedDict[str, SequenceBlocks] = OrderedDict()

    @staticmethod
    def blocks_for_mb(mb: float, num_layers: int, num_kv_heads: int, head_dim: int,
                      block_size: int, dtype: torch.dtype) -> int:
        """How many blocks fit in `mb` MiB of K+V."""
        per_block = 2 * num_layers * block_size * num_kv_heads * head_dim * dtype.itemsize
        return max(1, int(mb * 2**20) // per_block)

    # -- queries ---------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def __contains__(self, seq_id: str) -> bool:
        return seq_id in self._seqs

    def __len__(self) -> int:
        return len(self._seqs)

    def num_tokens(self, seq_id: str) -> int:
        return self._seqs[seq_id].num_tokens

    def block_table(self, seq_id: str) -> list[int]:
        return list(self._seqs[seq_id].block_ids)

    def sequence_ids(self) -> list[str]:
        """Least recently used first."""
        return list(self._seqs)

    # -- mutations -------------------------------------------------------------------------
    def create(self, seq_id: str) -> None:
        self.free(seq_id)
        self._seqs[seq_id] = SequenceBlocks()

    def touch(self, seq_id: str) -> None:
        self._seqs[seq_id].last_used = time.monotonic()
        self._seqs.move_to_end(seq_id)

    def reserve(self, seq_id: str, num_positions: int) -> NoRoom | None:
        """Make room for positions [0, num_positions); all-or-nothing. None on success."""
        seq = self._seqs[seq_id]
        needed = math.ceil(num_positions / self.block_size) - len(seq.block_ids)
        if needed <= 0:
            return None
        if needed > len(self._free):
            return NoRoom(needed=needed, free=len(self._free))
        seq.block_ids.extend(self._free.pop() for _ in range(needed))
        return None

    def take_scratch(self, num_blocks: int) -> list[int]:
        """Take `num_blocks` blocks out of the pool for good (no sequence owns them, nothing
        evicts or reuses them): scratch KV for padding rows (`kernels.cuda_graphs`)."""
        if num_blocks > len(self._free):
            raise ValueError(f"{num_blocks} scratch blocks asked, {len(self._free)} free")
        return [self._free.pop() for _ in range(num_blocks)]

    def set_num_tokens(self, seq_id: str, n: int) -> None:
        """Declare positions [0, n) valid; n must fit the reserved blocks."""
        seq = self._seqs[seq_id]
        if n < 0:
            raise ValueError(f"{n} positions is negative")
        if n > len(seq.block_ids) * self.block_size:
            raise ValueError(f"{n} positions exceed the {len(seq.block_ids)} reserved blocks")
        seq.num_tokens = n

    def truncate(self, seq_id: str, n: int) -> None:
        """Keep positions [0, n); blocks wholly past n return to the pool."""
        seq = self._seqs[seq_id]
        n = max(0, min(n, seq.num_tokens))
        keep = math.ceil(n / self.block_size)
        self._free.extend(reversed(seq.block_ids[keep:]))
        del seq.block_ids[keep:]
        seq.num_tokens = n

    def free(self, seq_id: str) -> bool:
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            return False
        self._free.extend(reversed(seq.block_ids))
        return True

    def evict_idle(self, idle_s: float, keep: set[str] = frozenset()) -> list[str]:
        """Free sequences idle for more than `idle_s` seconds (not in `keep`); return their ids."""
        now = time.monotonic()
        gone = [s for s, b in self._seqs.items() if s not in keep and now - b.last_used > idle_s]
        for s in gone:
            self.free(s)
        return gone

    def evict_lru(self, num_blocks: int, keep: set[str] = frozenset()) -> list[str]:
        """Free least-recently-used sequences (not in `keep`) until `num_blocks` are free."""
        gone = []
        for s in list(self._seqs):
            if len(self._free) >= num_blocks:
                break
            if s not in keep:
                self.free(s)
                gone.append(s)
        return gone

    def slots(self, seq_id: str, positions: torch.Tensor) -> torch.Tensor:
        """[n] positions -> [n] flat slot indices into the pool."""
        table = torch.tensor(self._seqs[seq_id].block_ids, dtype=torch.int64)
        pos = positions.long().cpu()
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def move(self, seq_id: str, src_positions: torch.Tensor, dst_start: int) -> None:
        """Copy the KV of `src_positions` [n] to positions dst_start.. (all layers)."""
        n = int(src_positions.numel())
        if n == 0:
            return
        src = self.slots(seq_id, src_positions).to(self.k.device)
        dst = self.slots(seq_id, torch.arange(dst_start, dst_start + n)).to(self.k.device)
        if torch.equal(src, dst):
            return
        for pool in (self.k, self.v):
            flat = pool.view(pool.shape[0], -1, *pool.shape[3:])  # [L, NB*BS, Hkv, D]
            flat[:, dst] = flat[:, src]
