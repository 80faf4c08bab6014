"""ModelRunner: one packed forward over many sequences sharing one paged KV cache.

On a GPU the forward replays a captured CUDA graph where the batch fits one
(`kernels.cuda_graphs`), and runs eagerly otherwise.

The runner turns `ForwardItem`s (a sequence, its new causal tokens and an optional tree) into
packed tensors + `AttentionMetadata`, runs the model, and hands back per-item logits for the
rows a speculative step needs: the last causal token and every tree node.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specmesh.kernels.attention_metadata import SequenceStep, build_metadata, to_device
from specmesh.kernels.cuda_graphs import CudaGraphs
from specmesh.kernels.kv_cache import PagedKVCache
from specmesh.kernels.loader import LoadedModel
from specmesh.kernels.tree import TreeBuffers


@dataclass(frozen=True)
class ForwardItem:
    seq_id: str
    new_tokens: list[int]  # causal tokens appended after the committed prefix
    tree: TreeBuffers | None = None  # draft tree after new_tokens; None = no tree
    # Only these tree nodes are computed (the rest are already cached); None = all of them.
    tree_query_nodes: list[int] | None = None


@dataclass
class ForwardOutput:
    # [int(has causal tokens) + num tree queries, vocab]: the last causal token's row (if any
    # causal tokens), then one row per computed tree node
    logits: torch.Tensor
    num_cached_before: int  # committed positions before this step


class ModelRunner:
    """Owns nothing but references: the loaded model and the KV cache it writes into."""

    def __init__(self, loaded: LoadedModel, kv: PagedKVCache):
        self.loaded = loaded
        self.kv = kv
        self.graphs = CudaGraphs.build(loaded, kv)  # None off CUDA (see kernels.cuda_graphs)

    def forward(self, items: list[ForwardItem]) -> list[ForwardOutput]:
        """Run all items in one forward. Blocks must be reserved (see `reserve`).

        On return each sequence's num_tokens covers its causal tokens; tree KV sits in the
        positions after them until the caller commits (`commit_tree_path`) or drops it.
        """
        steps: list[SequenceStep] = []
        tokens: list[int] = []  # packed over the items (plain lists: a few torch ops per item
        positions: list[int] = []  # cost more than the whole packing at c=16)
        rows: list[int] = []
        for it in items:
            tree = it.tree
            if not it.new_tokens and tree is None:
                raise ValueError(f"{it.seq_id}: a forward item needs new tokens or a tree")
            cached = self.kv.num_tokens(it.seq_id)
            n_causal = len(it.new_tokens)
            nodes = None
            if tree is not None and it.tree_query_nodes is not None:
                nodes = torch.tensor(it.tree_query_nodes, dtype=torch.int64)
            steps.append(SequenceStep(self.kv.block_table(it.seq_id), cached, n_causal,
                                      tree.ancestors if tree else None, nodes))
            offset = len(tokens)
            tokens += it.new_tokens
            positions += range(cached, cached + n_causal)
            if tree is not None:
                sel = nodes if nodes is not None else slice(None)
                tokens += tree.tokens[sel].tolist()
                positions += (cached + n_causal + tree.depths[sel]).tolist()
            first = offset + n_causal - 1 if n_causal else offset
            rows += range(first, len(tokens))
        logits = self._run(steps, torch.tensor(tokens, dtype=torch.int64),
                           torch.tensor(positions, dtype=torch.int64),
                           torch.tensor(rows, dtype=torch.int64))
        # logits: [sum(1 + n_tree), vocab]
        outs, start = [], 0
        for it, step in zip(items, steps):
            n = int(step.num_causal > 0) + step.num_tree_queries
            outs.append(ForwardOutput(logits[start:start + n], step.num_cached))
            start += n
            self.kv.set_num_tokens(it.seq_id, step.num_cached + step.num_causal)
            self.kv.touch(it.seq_id)
        return outs

    def _run(self, steps: list[SequenceStep], tokens: torch.Tensor, positions: torch.Tensor,
             rows: torch.Tensor) -> torch.Tensor:
        """One forward of the packed batch (tokens/positions [T], logits rows [M], on the
        host): a captured CUDA graph where one fits, else eager. [M, vocab] float32"""
        if self.graphs is not None:
            logits = self.graphs.run(steps, tokens, positions, rows)
            if logits is not None:
                return logits
        device = self.loaded.device
        meta = build_metadata(steps, self.kv.block_size)
        if device.type != "cpu":
            meta = to_device(meta, device)
        return self.loaded.model(tokens.to(device), positions.to(device), meta, self.kv.k,
                                 self.kv.v, rows.to(device))

    def commit_tree_path(self, seq_id: str, node_indices: list[int]) -> None:
        """Move the KV of accepted tree nodes to consecutive positions after the causal tokens."""
        base = self.kv.num_tokens(seq_id)
        if node_indices:
            src = torch.tensor(node_indices, dtype=torch.int64) + base
            self.kv.move(seq_id, src, base)
            self.kv.set_num_tokens(seq_id, base + len(node_indices))
        self.kv.truncate(seq_id, base + len(node_indices))
