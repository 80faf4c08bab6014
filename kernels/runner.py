"""ModelRunner: one packed forward over many sequences sharing one paged KV cache.

The runner turns `ForwardItem`s (a sequence, its new causal tokens and an optional tree) into
packed tensors + `AttentionMetadata`, runs the model, and hands back per-item logits for the
rows a speculative step needs: the last causal token and every tree node.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.attention_metadata import SequenceStep, build_metadata, to_device
from kernels.kv_cache import NoRoom, PagedKVCache
from kernels.loader import LoadedModel
from kernels.tree import TreeBuffers


@dataclass(frozen=True)
class ForwardItem:
    seq_id: str
    new_tokens: list[int]  # causal tokens appended after the committed prefix
    tree: TreeBuffers | None = None  # draft tree after new_tokens; None = no tree


@dataclass
class ForwardOutput:
    logits: torch.Tensor  # [1 + num_tree, vocab] last causal token's row, then each tree node's
    num_cached_before: int  # committed positions before this step


class ModelRunner:
    """Owns nothing but references: the loaded model and the KV cache it writes into."""

    def __init__(self, loaded: LoadedModel, kv: PagedKVCache):
        self.loaded = loaded
        self.kv = kv

    def reserve(self, items: list[ForwardItem]) -> NoRoom | None:
        """Reserve KV blocks for every item; on failure nothing is kept for the failing item."""
        for it in items:
            need = self.kv.num_tokens(it.seq_id) + len(it.new_tokens) + (
                it.tree.num_nodes if it.tree else 0)
            res = self.kv.reserve(it.seq_id, need)
            if res is not None:
                return res
        return None

    def forward(self, items: list[ForwardItem]) -> list[ForwardOutput]:
        """Run all items in one forward. Blocks must be reserved (see `reserve`).

        On return each sequence's num_tokens covers its causal tokens; tree KV sits in the
        positions after them until the caller commits (`commit_tree_path`) or drops it.
        """
        device = self.loaded.device
        steps, tokens, positions, rows = [], [], [], []
        offset = 0
        for it in items:
            if not it.new_tokens:
                raise ValueError(f"{it.seq_id}: a forward item needs at least one new token")
            cached = self.kv.num_tokens(it.seq_id)
            n_causal = len(it.new_tokens)
            tree = it.tree
            steps.append(SequenceStep(self.kv.block_table(it.seq_id), cached, n_causal,
                                      tree.ancestors if tree else None))
            tokens.append(torch.tensor(it.new_tokens, dtype=torch.int64))
            positions.append(torch.arange(cached, cached + n_causal))
            n_tree = 0
            if tree is not None:
                tokens.append(tree.tokens)
                positions.append(cached + n_causal + tree.depths)
                n_tree = tree.num_nodes
            rows.append(torch.arange(offset + n_causal - 1, offset + n_causal + n_tree))
            offset += n_causal + n_tree
        meta = build_metadata(steps, self.kv.block_size)
        if device.type != "cpu":
            meta = to_device(meta, device)
        logits_rows = torch.cat(rows)
        logits = self.loaded.model(
            torch.cat(tokens).to(device), torch.cat(positions).to(device), meta,
            self.kv.k, self.kv.v, logits_rows.to(device),
        )  # [sum(1 + n_tree), vocab]
        outs, start = [], 0
        for it, step in zip(items, steps):
            n = 1 + step.num_tree
            outs.append(ForwardOutput(logits[start:start + n], step.num_cached))
            start += n
            self.kv.set_num_tokens(it.seq_id, step.num_cached + step.num_causal)
            self.kv.touch(it.seq_id)
        return outs

    def commit_tree_path(self, seq_id: str, node_indices: list[int]) -> None:
        """Move the KV of accepted tree nodes to consecutive positions after the causal tokens."""
        base = self.kv.num_tokens(seq_id)
        if node_indices:
            src = torch.tensor(node_indices, dtype=torch.int64) + base
            self.kv.move(seq_id, src, base)
            self.kv.set_num_tokens(seq_id, base + len(node_indices))
        self.kv.truncate(seq_id, base + len(node_indices))
