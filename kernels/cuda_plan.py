"""CUDA tree attention, part 2 of 3: launch planning (pure host code, runs anywhere)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Must match the constants at the top of the .cu file.
KEYS_PER_TILE = 32
ROWS_PER_CTA = 16
THREADS_PER_CTA = 128
COMBINE_THREADS = 64
MIN_SPLIT_KEYS = 256  # below this a split costs more in combining than it buys in parallelism
MAX_SPLITS = 64


@dataclass(frozen=True)
class LaunchPlan:
    heads_per_cta: int  # RH: query heads of one KV head handled together (GQA)
    queries_per_cta: int  # QT: consecutive queries of one sequence per CTA
    head_chunks: int  # CTAs along one KV head's query heads (1 unless H / Hkv > 16)
    num_tiles: int  # query-tile slots: ceil(T / QT) + B bounds the real tile count
    num_splits: int  # split-K factor over the KV range
    split_size: int  # KV positions per split, a multiple of KEYS_PER_TILE
    smem_bytes: int  # dynamic shared memory per CTA

    def grid(self, num_kv_heads: int) -> tuple[int, int, int]:
        return (self.num_tiles, num_kv_heads * self.head_chunks, self.num_splits)


def plan_launch(num_tokens: int, num_seqs: int, num_heads: int, num_kv_heads: int,
                head_dim: int, max_seq_len: int, num_sms: int,
                num_splits: int | None = None) -> LaunchPlan:
    """Tile the batch into CTAs and choose the split-K factor (about two waves of CTAs)."""
    group = num_heads // num_kv_heads
    heads_per_cta = min(group, ROWS_PER_CTA)
    queries_per_cta = ROWS_PER_CTA // heads_per_cta
    head_chunks = -(-group // heads_per_cta)
    num_tiles = -(-num_tokens // queries_per_cta) + num_seqs
    max_seq_len = max(max_seq_len, 1)
    if num_splits is None:
        ctas = num_tiles * num_kv_heads * head_chunks
        wanted = -(-2 * num_sms // ctas)
        num_splits = min(wanted, -(-max_seq_len // MIN_SPLIT_KEYS), MAX_SPLITS)
    num_splits = max(1, num_splits)
    split_size = -(-max_seq_len // num_splits)
    split_size = -(-split_size // KEYS_PER_TILE) * KEYS_PER_TILE
    return LaunchPlan(
        heads_per_cta=heads_per_cta,
        queries_per_cta=queries_per_cta,
        head_chunks=head_chunks,
        num_tiles=num_tiles,
        num_splits=-(-max_seq_len // split_size),
        split_size=split_size,
        smem_bytes=smem_bytes(head_dim),
    )


def smem_bytes(head_dim: int) -> int:
    """Dynamic shared memory of one CTA: q [ROWS][D], K [KEYS][D + 4], V [KEYS][D] as fp32."""
    return 4 * (ROWS_PER_CTA * head_dim + KEYS_PER_TILE * (2 * head_dim + 4))


def query_tiles(cu_q_lens: torch.Tensor, num_tiles: int,
                queries_per_cta: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut every sequence's queries into tiles of `queries_per_cta` (on cu_q_lens's device, no
    host sync): tile_seq [num_tiles] int32 (-1 = unused slot), tile_start [num_tiles] int32."""
    cu = cu_q_lens.long()  # [B + 1]
    tiles = (cu[1:] - cu[:-1] + queries_per_cta - 1) // queries_per_cta  # [B]
    ends = torch.cumsum(tiles, 0)  # [B]
    index = torch.arange(num_tiles, device=cu.device)  # [N]
    seq = torch.searchsorted(ends, index, right=True)  # [N], sequence owning each tile slot
    used = seq < tiles.shape[0]
    seq_c = seq.clamp(max=tiles.shape[0] - 1)
    start = cu[seq_c] + (index - (ends - tiles)[seq_c]) * queries_per_cta  # [N]
    tile_seq = torch.where(used, seq, torch.full_like(seq, -1)).to(torch.int32)
    return tile_seq, torch.where(used, start, torch.zeros_like(start)).to(torch.int32)
