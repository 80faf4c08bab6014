"""A draft token tree as data, compiled once into the index tensors verification needs.

`parents[i] == -1` means node i hangs off the last token of the sequence; otherwise
`parents[i] < i` (nodes are in topological order, e.g. breadth first).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def validate_parents(parents: list[int], field: str = "tree.parents") -> None:
    """Raise ValueError naming `field` unless `parents` describes a tree in topological order."""
    for i, p in enumerate(parents):
        if not (-1 <= p < i):
            raise ValueError(f"{field}[{i}] = {p}: must be -1 or the index of an earlier node")


@dataclass(frozen=True)
class TreeBuffers:
    """Frozen index tensors of one tree (n nodes)."""

    tokens: torch.Tensor  # [n] int64
    parents: torch.Tensor  # [n] int64, -1 for root children
    depths: torch.Tensor  # [n] int64, 0 for root children
    ancestors: torch.Tensor  # [n, n] bool, ancestors[i, j]: j is i or an ancestor of i
    children: tuple[tuple[int, ...], ...]  # [n + 1] child lists; index 0 = root, i + 1 = node i

    @property
    def num_nodes(self) -> int:
        return int(self.tokens.shape[0])

    def path_to(self, node: int) -> list[int]:
        """Node indices from the root child down to `node` (inclusive)."""
        path = []
        while node >= 0:
            path.append(node)
            node = int(self.parents[node])
        return path[::-1]

    def retrieve_indices(self) -> torch.Tensor:
        """[num_leaves, max_depth + 1] node indices of each root-to-leaf path, padded with -1."""
        leaves = [i for i in range(self.num_nodes) if not self.children[i + 1]]
        paths = [self.path_to(leaf) for leaf in leaves]
        width = max((len(p) for p in paths), default=0)
        out = torch.full((len(paths), width), -1, dtype=torch.int64)
        for r, p in enumerate(paths):
            out[r, : len(p)] = torch.tensor(p)
        return out


def compile_tree(tokens: list[int], parents: list[int]) -> TreeBuffers:
    """Build the TreeBuffers of a tree given as parallel token/parent lists."""
    if len(tokens) != len(parents):
        raise ValueError(f"tree.tokens has {len(tokens)} entries but tree.parents {len(parents)}")
    validate_parents(parents)
    n = len(tokens)
    ancestors = torch.zeros(n, n, dtype=torch.bool)
    depths = torch.zeros(n, dtype=torch.int64)
    children: list[list[int]] = [[] for _ in range(n + 1)]
    for i, p in enumerate(parents):
        ancestors[i, i] = True
        if p >= 0:
            ancestors[i] |= ancestors[p]
            depths[i] = depths[p] + 1
        children[p + 1].append(i)
    return TreeBuffers(
        tokens=torch.tensor(tokens, dtype=torch.int64),
        parents=torch.tensor(parents, dtype=torch.int64),
        depths=depths,
        ancestors=ancestors,
        children=tuple(tuple(c) for c in children),
    )


def chain_tree(tokens: list[int]) -> TreeBuffers:
    return compile_tree(tokens, list(range(-1, len(tokens) - 1)))
