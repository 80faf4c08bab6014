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


def _pack_bits(rows: torch.Tensor) -> torch.Tensor:
    """[n, n] bool -> [n, MASK_WORDS] int64 with bit m of word m // 64 set where rows[:, m]."""
    n = rows.shape[0]
    padded = torch.zeros(n, MAX_TREE_NODES, dtype=torch.int64)
    padded[:, :n] = rows.to(torch.int64)
    weights = torch.ones(64, dtype=torch.int64) << torch.arange(64, dtype=torch.int64)
    return (padded.view(n, MASK_WORDS, 64) * weights).sum(-1)  # wraps into the sign bit: fine


def build_metadata(steps: list[SequenceStep], block_size: int) -> AttentionMetadata:
    """Pack a batch of SequenceSteps; tree nodes are laid out after each sequence's causal tokens."""
    max_blocks = max(len(s.block_table) for s in steps)
    block_tables = torch.zeros(len(steps), max(max_blocks, 1), dtype=torch.int32)
    seq_lens, tree_starts, cu = [], [], [0]
    q_seq, q_prefix, slots, masks = [], [], [], []
    for b, s in enumerate(steps):
        if s.num_tree > MAX_TREE_NODES:
            raise ValueError(f"tree of {s.num_tree} nodes exceeds {MAX_TREE_NODES}")
        table = torch.tensor(s.block_table, dtype=torch.int64)
        block_tables[b, : len(s.block_table)] = table.to(torch.int32)
        start = s.num_cached + s.num_causal
        total = start + s.num_tree
        if total > len(s.block_table) * block_size:
            raise ValueError(f"sequence {b}: {total} positions but {len(s.block_table)} blocks")
        nodes = (s.tree_query_nodes if s.tree_query_nodes is not None
                 else torch.arange(s.num_tree, dtype=torch.int64))
        positions = torch.cat([torch.arange(s.num_cached, start, dtype=torch.int64), start + nodes])
        slots.append(table[positions // block_size] * block_size + positions % block_size)
        seq_lens.append(total)
        tree_starts.append(start)
        cu.append(cu[-1] + s.num_new)
        q_seq.append(torch.full((s.num_new,), b, dtype=torch.int64))
        q_prefix.append(torch.cat([
            torch.arange(s.num_cached + 1, start + 1, dtype=torch.int32),
            torch.full((s.num_tree_queries,), start, dtype=torch.int32),
        ]))
        mask = torch.zeros(s.num_new, MASK_WORDS, dtype=torch.int64)
        if s.tree_ancestors is not None:
            mask[s.num_causal:] = _pack_bits(s.tree_ancestors)[nodes]
        masks.append(mask)
    return AttentionMetadata(
        block_tables=block_tables,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        cu_q_lens=torch.tensor(cu, dtype=torch.int32),
        q_seq_idx=torch.cat(q_seq),
        q_prefix_lens=torch.cat(q_prefix),
        tree_starts=torch.tensor(tree_starts, dtype=torch.int32),
        tree_masks=torch.cat(masks),
        slot_mapping=torch.cat(slots),
        block_size=block_size,
        max_seq_len=max(seq_lens),
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
