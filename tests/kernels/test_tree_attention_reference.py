"""The PyTorch tree-attention reference (the CPU path and the CUDA kernel's oracle) against the
plainest possible statement of tree attention: every root-to-leaf path of the draft tree, laid
after the sequence's committed and causal tokens, is an ordinary causal sequence.

`make_batch` is shared with tests/kernels/test_cuda_kernel.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from specmesh.kernels.attention_metadata import AttentionMetadata, SequenceStep, build_metadata
from specmesh.kernels.reference import tree_attention_reference
from specmesh.kernels.tree import TreeBuffers, compile_tree


def random_parents(n: int, gen: torch.Generator) -> list[int]:
    """A random tree in topological order: parents[i] in [-1, i)."""
    return [int(torch.randint(-1, i, (1,), generator=gen)) if i else -1 for i in range(n)]


@dataclass
class Batch:
    q: torch.Tensor  # [T, H, D]
    k_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D]
    meta: AttentionMetadata
    steps: list[SequenceStep]
    trees: list[TreeBuffers | None]


def make_batch(*, seed: int, prefix_lens: list[int], tree_sizes: list[int],
               num_causal: list[int], block_size: int, num_heads: int, num_kv_heads: int,
               head_dim: int, dtype: torch.dtype = torch.float32,
               query_subset: bool = False) -> Batch:
    """Random sequences with random trees in a paged cache whose blocks are shuffled across the
    whole pool (so logical neighbours are physically apart); q, K and V ~ N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    totals = [p + c + n for p, c, n in zip(prefix_lens, num_causal, tree_sizes)]
    blocks_per_seq = [-(-total // block_size) + 1 for total in totals]  # one spare each
    pool = torch.randperm(sum(blocks_per_seq) + 2, generator=gen).tolist()  # 2 never used
    steps, trees, offset = [], [], 0
    for prefix, causal, n, num_blocks in zip(prefix_lens, num_causal, tree_sizes,
                                             blocks_per_seq):
        tree = compile_tree(list(range(n)), random_parents(n, gen)) if n else None
        query_nodes = None
        if tree is not None and query_subset:  # e.g. a draft computing its deepest level only
            query_nodes = torch.nonzero(tree.depths == tree.depths.max()).flatten()
        steps.append(SequenceStep(
            block_table=pool[offset: offset + num_blocks], num_cached=prefix, num_causal=causal,
            tree_ancestors=None if tree is None else tree.ancestors,
            tree_query_nodes=query_nodes))
        trees.append(tree)
        offset += num_blocks
    meta = build_metadata(steps, block_size)
    cache_shape = (len(pool), block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(cache_shape, generator=gen).to(dtype)
    v_cache = torch.randn(cache_shape, generator=gen).to(dtype)
    q = torch.randn(meta.num_tokens, num_heads, head_dim, generator=gen).to(dtype)
    return Batch(q, k_cache, v_cache, meta, steps, trees)


def logical_kv(cache: torch.Tensor, step: SequenceStep, length: int) -> torch.Tensor:
    """[length, Hkv, D]: a sequence's KV positions 0 .. length-1 read through its block table."""
    block_size = cache.shape[1]
    pos = torch.arange(length)
    slots = torch.tensor(step.block_table)[pos // block_size] * block_size + pos % block_size
    return cache.reshape(-1, *cache.shape[2:])[slots]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """q [n, H, D] at sequence indices q_pos [n] over k, v [L, Hkv, D]: index i sees 0 .. i.
    Computed in float64 with an explicit softmax."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)  # [L, H, D]
    v = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,lhd->hnl", q.double(), k) * scale  # [H, n, L]
    visible = torch.arange(k.shape[0])[None, :] <= q_pos[:, None]  # [n, L]
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hnl,lhd->nhd", scores.softmax(-1), v)  # [n, H, D]


def path_oracle(batch: Batch, scale: float) -> torch.Tensor:
    """[T, H, D] float64: every query's output from ordinary causal attention along a
    root-to-leaf path (each node is checked on every path through it)."""
    expected = torch.full(batch.q.shape, float("nan"), dtype=torch.float64)
    cu = batch.meta.cu_q_lens.tolist()
    for b, (step, tree) in enumerate(zip(batch.steps, batch.trees)):
        start = step.num_cached + step.num_causal
        k_seq = logical_kv(batch.k_cache, step, start + step.num_tree)
        v_seq = logical_kv(batch.v_cache, step, start + step.num_tree)
        q_seq = batch.q[cu[b]: cu[b + 1]]
        causal_idx = torch.arange(step.num_causal)
        causal_pos = step.num_cached + causal_idx
        if step.num_causal:
            expected[cu[b] + causal_idx] = causal_attention(
                q_seq[causal_idx], k_seq, v_seq, causal_pos, scale)
        if tree is None:
            continue
        nodes = (step.tree_query_nodes.tolist() if step.tree_query_nodes is not None
                 else list(range(tree.num_nodes)))
        row_of = {node: step.num_causal + i for i, node in enumerate(nodes)}
        for path in tree.retrieve_indices().tolist():
            path = [node for node in path if node >= 0]
            order = torch.cat([torch.arange(start), start + torch.tensor(path)])
            on_path = [(j, row_of[node]) for j, node in enumerate(path) if node in row_of]
            if not on_path:
                continue
            idx = torch.tensor([row for _, row in on_path])
            out = causal_attention(q_seq[idx], k_seq[order], v_seq[order],
                                   torch.tensor([start + j for j, _ in on_path]), scale)
            previous = expected[cu[b] + idx]
            seen = ~previous.isnan()
            assert torch.allclose(previous[seen], out[seen], atol=1e-9)  # same on every path
            expected[cu[b] + idx] = out
    assert not expected.isnan().any(), "oracle left a query uncovered"
    return expected


CASES = {
    # name: (prefix_lens, tree_sizes, num_causal, block_size, heads, kv_heads)
    "tree_only_no_prefix": ([0, 0], [9, 16], [0, 0], 4, 2, 2),
    "prefix_and_tree": ([13, 37, 5], [12, 1, 25], [0, 0, 0], 8, 4, 2),
    "causal_run_then_tree": ([20, 0], [7, 30], [3, 5], 16, 4, 1),
    "prefill_chunk_no_tree": ([0, 17], [0, 0], [9, 11], 4, 2, 1),
    "max_tree_128": ([31], [128], [1], 16, 2, 2),
}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("case", sorted(CASES))
def test_reference_equals_causal_attention_along_every_path(case, seed):
    prefix, trees, causal, block_size, heads, kv_heads = CASES[case]
    batch = make_batch(seed=seed, prefix_lens=prefix, tree_sizes=trees, num_causal=causal,
                       block_size=block_size, num_heads=heads, num_kv_heads=kv_heads,
                       head_dim=16)
    scale = 16 ** -0.5
    out = tree_attention_reference(batch.q, batch.k_cache, batch.v_cache, batch.meta, scale)
    torch.testing.assert_close(out.double(), path_oracle(batch, scale), atol=1e-5, rtol=0)


def test_reference_with_partially_computed_tree():
    """Only the deepest tree level is queried; the rest of the tree is already in the cache."""
    batch = make_batch(seed=3, prefix_lens=[10, 3], tree_sizes=[20, 11], num_causal=[0, 0],
                       block_size=4, num_heads=2, num_kv_heads=1, head_dim=8,
                       query_subset=True)
    out = tree_attention_reference(batch.q, batch.k_cache, batch.v_cache, batch.meta, 0.3)
    torch.testing.assert_close(out.double(), path_oracle(batch, 0.3), atol=1e-5, rtol=0)


def test_tree_node_ignores_siblings_and_their_subtrees():
    """Changing the KV of a node off a query's root path leaves that query's output unchanged."""
    batch = make_batch(seed=4, prefix_lens=[6], tree_sizes=[10], num_causal=[0],
                       block_size=4, num_heads=1, num_kv_heads=1, head_dim=8)
    tree, step = batch.trees[0], batch.steps[0]
    out = tree_attention_reference(batch.q, batch.k_cache, batch.v_cache, batch.meta, 0.5)
    leaf = tree.num_nodes - 1
    off_path = [m for m in range(tree.num_nodes) if not tree.ancestors[leaf, m]]
    assert off_path, "seed 4 must give a branching tree"
    pos = torch.tensor(off_path) + step.num_cached
    slots = torch.tensor(step.block_table)[pos // 4] * 4 + pos % 4
    k_changed = batch.k_cache.clone()
    k_changed.view(-1, 1, 8)[slots] += 100.0
    changed = tree_attention_reference(batch.q, k_changed, batch.v_cache, batch.meta, 0.5)
    assert torch.equal(changed[leaf], out[leaf])
