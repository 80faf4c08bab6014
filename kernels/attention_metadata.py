"""The packed (varlen) description of one forward pass over many sequences.

Every sequence b in the batch has `seq_lens[b]` KV slots after this step's writes: a committed
prefix of `seq_lens[b] - num_new[b]` tokens followed by this step's `num_new[b]` new tokens.
The new tokens are a run of ordinary (causal) tokens, optionally followed by a draft tree:

    query t (belonging to sequence b) attends to
      * every KV position  <  q_prefix_lens[t]              (the causal part), and
      * position tree_starts[b] + m  for every bit m set in tree_masks[t]   (tree ancestors + self)

Causal tokens have q_prefix_lens = own position + 1 and an empty mask; tree nodes have
q_prefix_lens = tree_starts[b] (they see every committed and causal token) and the ancestor bitmask.
This is exactly what the CUDA kernel consumes; the PyTorch reference expands it to a dense mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

MAX_TREE_NODES = 128
MASK_WORDS = MAX_TREE_NODES // 64


@dataclass
class AttentionMetadata:
    block_tables: torch.Tensor  # [B, max_blocks] int32, physical block of each logical block
    seq_lens: torch.Tensor  # [B] int32, KV length of each sequence after this step
    cu_q_lens: torch.Tensor  # [B + 1] int32, offsets of each sequence's queries in the packed batch
    q_seq_idx: torch.Tensor  # [T] int64, sequence of each query
    q_prefix_lens: torch.Tensor  # [T] int32, causal-visible KV length of each query
    tree_starts: torch.Tensor  # [B] int32, KV position of tree node 0 (== seq_lens if no tree)
    tree_masks: torch.Tensor  # [T, MASK_WORDS] int64, ancestor-or-self bits over tree nodes
    slot_mapping: torch.Tensor  # [T] int64, flat KV slot (block * block_size + offset) per query
    block_size: int
    max_seq_len: int
    _dense: dict = field(default_factory=dict, repr=False)

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.q_seq_idx.shape[0])


@dataclass(frozen=True)
class SequenceStep:
    """One sequence's part of a forward: where its KV lives and what is new this step."""

    block_table: list[int]  # physical blocks, in logical order
    num_cached: int  # committed KV positions before this step
    num_causal: int  # new ordinary tokens (prefill chunk or accepted tokens)
    tree_ancestors: torch.Tensor | None = None  # [n, n] bool, ancestor-or-self; None = no tree
    # Tree nodes computed this step (their KV is written); the others must already be in the
    # cache at tree_start + index (a draft growing its tree depth by depth). None = all nodes.
    tree_query_nodes: torch.Tensor | None = None  # [m] int64, ascending

    @property
    def num_tree(self) -> int:
        return 0 if self.tree_ancestors is None else int(self.tree_ancestors.shape[0])

    @property
    def num_tree_queries(self) -> int:
        if self.tree_query_nodes is not None:
            return int(self.tree_query_nodes.shape[0])
        return self.num_tree

    @property
    def num_new(self) -> int:
        """Queries of this sequence in the packed batch."""
        return self.num_causal + self.num_tree_queries


def _pack_bits(rows: np.ndarray) -> np.ndarray:
    """[n, n] bool -> [n, MASK_WORDS] int64 with bit m of word m // 64 set where rows[:, m]."""
    padded = np.zeros((rows.shape[0], MAX_TREE_NODES), dtype=bool)
    padded[:, :rows.shape[1]] = rows
    packed = np.packbits(padded, axis=1, bitorder="little")  # [n, 16] uint8
    return packed.view("<u8").astype(np.int64, copy=False).reshape(rows.shape[0], MASK_WORDS)


def build_metadata(steps: list[SequenceStep], block_size: int) -> AttentionMetadata:
    """Pack a batch of SequenceSteps; tree nodes are laid out after each sequence's causal tokens.
    (numpy, vectorised over the queries: this runs before every forward.)"""
    num_seqs = len(steps)
    max_blocks = max(1, max(len(s.block_table) for s in steps))
    tables = np.zeros((num_seqs, max_blocks), dtype=np.int64)  # [B, max_blocks]
    cached = np.empty(num_seqs, dtype=np.int64)
    causal = np.empty(num_seqs, dtype=np.int64)
    num_tree = np.empty(num_seqs, dtype=np.int64)
    num_new = np.empty(num_seqs, dtype=np.int64)
    for b, s in enumerate(steps):
        if s.num_tree > MAX_TREE_NODES:
            raise ValueError(f"tree of {s.num_tree} nodes exceeds {MAX_TREE_NODES}")
        tables[b, :len(s.block_table)] = s.block_table
        cached[b], causal[b], num_tree[b], num_new[b] = (s.num_cached, s.num_causal, s.num_tree,
                                                         s.num_new)
        if s.num_cached + s.num_causal + s.num_tree > len(s.block_table) * block_size:
            raise ValueError(f"sequence {b}: {s.num_cached + s.num_causal + s.num_tree} "
                             f"positions but {len(s.block_table)} blocks")
    starts = cached + causal  # [B] KV position of tree node 0
    cu = np.zeros(num_seqs + 1, dtype=np.int64)
    np.cumsum(num_new, out=cu[1:])
    q_seq = np.repeat(np.arange(num_seqs), num_new)  # [T]
    local = np.arange(cu[-1]) - cu[q_seq]  # [T] index within its sequence's queries
    is_causal = local < causal[q_seq]
    positions = np.where(is_causal, cached[q_seq] + local, starts[q_seq] + local - causal[q_seq])
    masks = np.zeros((cu[-1], MASK_WORDS), dtype=np.int64)  # [T, MASK_WORDS]
    for b, s in enumerate(steps):
        if s.tree_ancestors is None:
            continue
        first, last = cu[b] + s.num_causal, cu[b + 1]
        bits = _pack_bits(s.tree_ancestors.numpy())
        if s.tree_query_nodes is not None:  # only these nodes are computed
            nodes = s.tree_query_nodes.numpy()
            positions[first:last] = starts[b] + nodes
            bits = bits[nodes]
        masks[first:last] = bits
    slots = tables[q_seq, positions // block_size] * block_size + positions % block_size
    q_prefix = np.where(is_causal, positions + 1, starts[q_seq])
    seq_lens = starts + num_tree
    return AttentionMetadata(
        block_tables=torch.from_numpy(tables.astype(np.int32)),
        seq_lens=torch.from_numpy(seq_lens.astype(np.int32)),
        cu_q_lens=torch.from_numpy(cu.astype(np.int32)),
        q_seq_idx=torch.from_numpy(q_seq.astype(np.int64)),
        q_prefix_lens=torch.from_numpy(q_prefix.astype(np.int32)),
        tree_starts=torch.from_numpy(starts.astype(np.int32)),
        tree_masks=torch.from_numpy(masks),
        slot_mapping=torch.from_numpy(slots.astype(np.int64)),
        block_size=block_size,
        max_seq_len=int(seq_lens.max()),
    )


def unpack_bits(words: torch.Tensor, n: int) -> torch.Tensor:
    """[T, MASK_WORDS] int64 -> [T, n] bool (inverse of the packing in build_metadata)."""
    bits = torch.arange(64, dtype=torch.int64, device=words.device)
    expanded = (words.unsqueeze(-1) >> bits) & 1  # [T, MASK_WORDS, 64]
    return expanded.view(words.shape[0], -1)[:, :n].bool()


def to_device(meta: AttentionMetadata, device: torch.device) -> AttentionMetadata:
    """Move every tensor field to `device` (the dense-mask cache is dropped)."""
    moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v)
             for k, v in vars(meta).items() if k != "_dense"}
    return AttentionMetadata(**moved)
