"""Model-free drafting (prompt lookup): propose what followed earlier occurrences of the last n
tokens of the sequence. Pure functions over a token array; no torch, no gRPC.

    tokens, parents = propose_tree(history, budget=8, config=NgramConfig())

For n from `max_n` down to `min_n`, every earlier position where the sequence's last n tokens
occur (most recent first, at most `max_matches`) contributes the tokens that followed it, up to
`max_depth` of them. The continuations are merged into a trie; each trie node scores the
matches that pass through it, a match of a longer n counting more (it is more specific),
discounted by DEPTH_DECAY per level. The `budget` best nodes are kept (a parent always ranks above
its children, so the kept set is a tree) and returned in topological order: several matches make
a tree, not a chain. `extra` continuations (the fleet table, `ngram_fleet`) join the same trie
with their own weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DEPTH_DECAY = 0.8  # weight of a node one token deeper along the same matches


@dataclass(frozen=True)
class NgramConfig:
    min_n: int = 1
    """Shortest suffix looked up (1: a single token)."""
    max_n: int = 4
    """Longest suffix looked up."""
    max_depth: int = 8
    """Most tokens proposed after one match."""
    max_matches: int = 32
    """Most recent occurrences used per suffix length."""

    def __post_init__(self):
        if not 1 <= self.min_n <= self.max_n:
            raise ValueError(f"need 1 <= min_n ({self.min_n}) <= max_n ({self.max_n})")
        if self.max_depth < 1 or self.max_matches < 1:
            raise ValueError("max_depth and max_matches must be >= 1")


def match_starts(history: np.ndarray, n: int, limit: int) -> np.ndarray:
    """Positions just after each earlier occurrence of the last `n` tokens (most recent first,
    at most `limit`), excluding the suffix itself. history: [L] int."""
    length = len(history)
    if length <= n:
        return np.zeros(0, dtype=np.int64)
    suffix = history[length - n:]  # [n]
    windows = np.lib.stride_tricks.sliding_window_view(history[:length - 1], n)  # [L - n, n]
    hits = np.flatnonzero((windows == suffix).all(axis=1)) + n  # [m] where the continuation starts
    return hits[::-1][:limit]


def propose_tree(history: np.ndarray, budget: int, config: NgramConfig = NgramConfig(),
                 chain: bool = False, extra: Sequence[tuple[float, Sequence[int]]] = ()
                 ) -> tuple[list[int], list[int]]:
    """(tokens, parents) of at most `budget` draft nodes (parents[i] = -1 for a child of the last
    token, else an earlier index); empty when nothing in `history` repeats its suffix and
    `extra` is empty. `chain`: one path, the best-supported child at every step. `extra`:
    (weight, continuation) pairs from elsewhere (the fleet table), merged into the same trie
    after the local matches, each adding `weight` to the nodes of its path."""
    if budget <= 0:
        return [], []
    history = np.asarray(history)
    trie = _Trie()
    for n in range(min(config.max_n, len(history) - 1), config.min_n - 1, -1):
        for start in match_starts(history, n, config.max_matches).tolist():
            trie.add(history[start:start + config.max_depth].tolist(), n)  # longer: stronger
    for weight, continuation in extra:
        trie.add(list(continuation[:config.max_depth]), weight)
    if chain:
        return _best_path(trie.children, trie.token_of, trie.score, budget)
    return trie.best_nodes(budget)


class _Trie:
    """Continuations merged by shared prefix; node 0 is the root (the last committed token)."""

    def __init__(self):
        self.children: list[dict[int, int]] = [{}]  # node -> {token: child node}
        self.token_of, self.parent_of, self.score = [-1], [-1], [0.0]

    def add(self, tokens: list[int], weight: float) -> None:
        node = 0
        for tok in tokens:
            nxt = self.children[node].get(tok)
            if nxt is None:
                nxt = len(self.token_of)
                self.children[node][tok] = nxt
                self.children.append({})
                self.token_of.append(tok)
                self.parent_of.append(node)
                self.score.append(0.0)
            self.score[nxt] += weight
            node = nxt

    def best_nodes(self, budget: int) -> tuple[list[int], list[int]]:
        token_of, parent_of, score = self.token_of, self.parent_of, self.score
        depth = [0] * len(token_of)
        for i in range(1, len(token_of)):
            depth[i] = depth[parent_of[i]] + 1
        # evidence, discounted with depth (a match need not continue): a parent always ranks
        # above its children (at least their score, one step shallower), so the kept set is a
        # tree; ties go to the shallower node (breadth), then to the earliest created (the most
        # recent local match; local matches before fleet evidence)
        kept = sorted(range(1, len(token_of)),
                      key=lambda i: (-score[i] * DEPTH_DECAY ** depth[i], depth[i], i))[:budget]
        kept.sort()  # creation order is topological (a parent is created before its children)
        index = {node: i for i, node in enumerate(kept)}
        tokens = [token_of[node] for node in kept]
        parents = [index[parent_of[node]] if parent_of[node] else -1 for node in kept]
        return tokens, parents


def _best_path(children: list[dict[int, int]], token_of: list[int], score: list[float],
               budget: int) -> tuple[list[int], list[int]]:
    """From the root, the child with the most evidence (ties: the most recent match) each step."""
    tokens: list[int] = []
    node = 0
    while children[node] and len(tokens) < budget:
        node = min(children[node].values(), key=lambda c: (-score[c], c))
        tokens.append(token_of[node])
    return tokens, list(range(-1, len(tokens) - 1))
