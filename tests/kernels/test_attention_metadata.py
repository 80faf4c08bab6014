"""build_metadata (numpy, vectorised) against the per-sequence torch construction it replaced,
kept here as the oracle, over random batches of causal runs, trees and partial trees."""

from __future__ import annotations

import random

import pytest
import torch

from specmesh.kernels.attention_metadata import (
    MASK_WORDS,
    MAX_TREE_NODES,
    AttentionMetadata,
    SequenceStep,
    build_metadata,
)
from specmesh.kernels.tree import compile_tree


def _oracle_pack_bits(rows: torch.Tensor) -> torch.Tensor:
    """[n, n] bool -> [n, MASK_WORDS] int64 with bit m of word m // 64 set where rows[:, m]."""
    n = rows.shape[0]
    padded = torch.zeros(n, MAX_TREE_NODES, dtype=torch.int64)
    padded[:, :n] = rows.to(torch.int64)
    weights = torch.ones(64, dtype=torch.int64) << torch.arange(64, dtype=torch.int64)
    return (padded.view(n, MASK_WORDS, 64) * weights).sum(-1)  # wraps into the sign bit: fine


def oracle_metadata(steps: list[SequenceStep], block_size: int) -> AttentionMetadata:
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
            mask[s.num_causal:] = _oracle_pack_bits(s.tree_ancestors)[nodes]
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


def _random_steps(rng: random.Random, block_size: int) -> list[SequenceStep]:
    steps, free = [], list(range(400))
    rng.shuffle(free)
    for _ in range(rng.randint(1, 6)):
        cached, causal = rng.randint(0, 40), rng.randint(0, 5)
        n = rng.choice([0, 0, 1, 3, 7, 70]) if causal else rng.choice([1, 4, 9])
        tree = compile_tree([rng.randrange(500) for _ in range(n)],
                            [-1] + [rng.randrange(i) for i in range(1, n)]) if n else None
        nodes = None
        if tree is not None and rng.random() < 0.3:
            nodes = torch.tensor(sorted(rng.sample(range(n), rng.randint(1, n))))
        blocks = -(-(cached + causal + n) // block_size) + rng.randint(0, 2)
        table = [free.pop() for _ in range(max(blocks, 1))]
        steps.append(SequenceStep(table, cached, causal, tree.ancestors if tree else None, nodes))
    return steps


@pytest.mark.parametrize("seed", range(40))
def test_build_metadata_equals_the_oracle(seed):
    rng = random.Random(seed)
    block_size = rng.choice([1, 4, 16])
    steps = _random_steps(rng, block_size)
    got, want = build_metadata(steps, block_size), oracle_metadata(steps, block_size)
    for name in ("block_tables", "seq_lens", "cu_q_lens", "q_seq_idx", "q_prefix_lens",
                 "tree_starts", "tree_masks", "slot_mapping"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert (got.block_size, got.max_seq_len) == (want.block_size, want.max_seq_len)
    assert got.tree_masks.shape[1] == MASK_WORDS


def test_build_metadata_refuses_too_big_trees_and_missing_blocks():
    big = compile_tree(list(range(MAX_TREE_NODES + 1)), [-1] + list(range(MAX_TREE_NODES)))
    with pytest.raises(ValueError, match="exceeds"):
        build_metadata([SequenceStep(list(range(20)), 0, 1, big.ancestors)], 16)
    with pytest.raises(ValueError, match="blocks"):
        build_metadata([SequenceStep([0], 10, 7)], 16)
    assert isinstance(build_metadata([SequenceStep([3], 0, 2)], 16), AttentionMetadata)
