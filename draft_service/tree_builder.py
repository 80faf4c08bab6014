"""Grow one sequence's draft tree depth by depth from the draft model's distributions.

One `TreeGrower` per sequence; the engine batches the forwards of all growers per depth.
Children of a node are its top-k tokens under greedy decoding, or k draws without replacement
from the (fp16-quantised) draft distribution under sampling; the verifier's rejection sampler
relies on exactly that. How many children each node gets is decided before they are drawn
(from the parent's path and distribution only), so the tree shape never biases sampling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from specmesh.draft_service import draft_sampling, spine_leaves
from specmesh.kernels.sampling import SamplingConfig, warp_logits_to_probs
from specmesh.wire.tree_spec import TreeSpec


def draft_distribution(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """[N, vocab] logits -> [N, vocab] probabilities the children are chosen from.

    Under sampling the probabilities are rounded to fp16 and renormalised, exactly as the
    verifier will decode them from the wire.
    """
    if sampling.greedy:
        return torch.softmax(logits.float(), dim=-1)
    q16 = warp_logits_to_probs(logits, sampling).half().float()  # [N, vocab]
    return q16 / q16.sum(-1, keepdim=True)


@dataclass
class TreeGrower:
    spec: TreeSpec
    sampling: SamplingConfig
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    logcum: list[float] = field(default_factory=list)  # log cumulative draft probability
    dists: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # row -> sparse
    frontier: list[int] = field(default_factory=list)  # nodes whose children come next
    depth: int = 0  # depth of the nodes in `frontier`
    spine: bool = False  # a dynamic tree grown as a chain plus leaves (`spine_leaves`)
    leaves: list[tuple[int, int]] = field(default_factory=list)  # (parent, token), `finish`

    @property
    def is_chain(self) -> bool:
        """Grown one node a depth, fed as causal tokens (a chain, or a dynamic tree's spine)."""
        return self.spec.kind == "chain" or self.spine

    @property
    def width(self) -> int:
        """Most new nodes per depth of a dynamic tree."""
        return max(1, math.ceil(self.spec.node_budget / max(1, self.spec.depth)))

    @property
    def needs_forward(self) -> bool:
        return bool(self.frontier) and self.depth + 1 < self.spec.depth and self._room() > 0

    def _room(self) -> int:
        return self.spec.max_nodes - len(self.tokens)

    def grow_root(self, logits: torch.Tensor) -> None:
        """logits [vocab] after the last committed token: choose the depth-0 nodes."""
        self.frontier = self._expand([-1], logits[None])
        self.depth = 0

    @property
    def chain_left(self) -> int:
        """Forwards a chain still needs (one node each)."""
        return min(self.spec.depth - 1 - self.depth, self._room()) if self.frontier else 0

    def start_chain(self, tokens: list[int], q: np.ndarray | None = None) -> None:
        """A greedy chain chosen outside from the root: tokens[0] is the root's child (what
        `grow_root` would choose), the rest as `extend_chain` (q [steps, vocab] likewise)."""
        self.frontier, self.depth = [-1], -1
        self.extend_chain(tokens, q)

    def start_sampled_chain(self, tokens: list[int], q: np.ndarray,
                            expo: np.ndarray | None = None) -> None:
        """A sampled chain drawn outside from the root: tokens[s] from q[s] [vocab], as
        `extend_sampled` (tokens[0] the root's child, q[0] the root's distribution)."""
        self.frontier, self.depth = [-1], -1
        self.extend_sampled(tokens, q, expo)

    def extend_chain(self, tokens: list[int], q: np.ndarray | None = None) -> None:
        """Append a greedy chain's next nodes, chosen outside (`kernels.cpu_chain`): each the
        argmax after the previous one, as `grow` would choose them. A spine needs q
        [steps, vocab], the distribution each was chosen from (its leaves come from it)."""
        for s, tok in enumerate(tokens):
            children = [int(tok)]
            if self.spine:
                n = self._leaf_count(self.frontier[-1], q[s])
                children += spine_leaves.greedy_leaves(q[s], int(tok), n)
            self.frontier = self._add([self.frontier[-1]], [children],
                                      None if q is None else q[s][None])
            self.depth += 1

    def extend_sampled(self, tokens: list[int], q: np.ndarray,
                       expo: np.ndarray | None = None) -> None:
        """Append a sampled chain's next nodes, drawn outside (`kernels.cpu_chain`): tokens[s]
        from q[s] [vocab], the fp16 distribution it was drawn from (kept for the verifier).
        A spine needs expo [steps, vocab], the race each was drawn by (its leaves finish next)."""
        for s, (tok, row) in enumerate(zip(tokens, q)):
            parent = self.frontier[-1]
            support = np.flatnonzero(row > 0)
            self.dists[parent + 1] = (support.astype(np.int32), row[support].astype(np.float16))
            children = [int(tok)]
            if self.spine:
                n = self._leaf_count(parent, row)
                children += spine_leaves.sampled_leaves(row, expo[s], int(tok), n)
            self.frontier = self._add([parent], [children], row[None])
            self.depth += 1

    def _leaf_count(self, parent: int, q: np.ndarray) -> int:
        """A spine's leaves at the next depth (q [vocab] the parent's distribution)."""
        room = self.spec.max_nodes - self.spec.depth - len(self.leaves)
        return spine_leaves.leaf_count(0.0 if parent < 0 else self.logcum[parent], q, room)

    def finish(self) -> None:
        """A spine's leaves join the tree after its nodes (the chain the draft fed stays the
        tree's first nodes, and the order stays topological)."""
        for parent, tok in self.leaves:
            self.tokens.append(tok)
            self.parents.append(parent)
        self.leaves = []

    def grow(self, logits: torch.Tensor) -> None:
        """logits [len(frontier), vocab]: choose the next depth's nodes."""
        self.frontier = self._expand(self.frontier, logits)
        self.depth += 1

    def _expand(self, parents: list[int], logits: torch.Tensor) -> list[int]:
        if logits.device.type != "cpu":  # a GPU's rows: the request's generator, the wire
            logits = logits.cpu()  # format and the tree's bookkeeping live on the CPU
        if not self.sampling.greedy:
            return self._expand_sampled(parents, logits)
        q = draft_distribution(logits, self.sampling)  # [P, vocab]
        counts = self._counts(parents, q)
        children = [torch.topk(q[row], k).indices.tolist() if k else []
                    for row, k in enumerate(counts)]
        return self._add(parents, children, q.numpy())

    def _expand_sampled(self, parents: list[int], logits: torch.Tensor) -> list[int]:
        """k draws without replacement per parent from its fp16 draft distribution, which is
        kept (sparse) for the verifier; numpy, one row's ops cost microseconds
        (`draft_service.draft_sampling`)."""
        q = draft_sampling.draft_probs(logits.float().numpy(), self.sampling)  # [P, vocab]
        counts = self._counts(parents, torch.from_numpy(q))
        children = []
        for row, (parent, k) in enumerate(zip(parents, counts)):
            if k:
                support = np.flatnonzero(q[row] > 0)
                self.dists[parent + 1] = (support.astype(np.int32),
                                          q[row, support].astype(np.float16))
            children.append(draft_sampling.race(q[row], k, self.generator).tolist()
                            if k else [])
        return self._add(parents, children, q)

    def _add(self, parents: list[int], children: list[list[int]],
             q: np.ndarray | None) -> list[int]:
        """Append each parent's chosen children (q [P, vocab]: their log-probability joins the
        path's; None for a plain chain, which needs none); returns the new nodes. A spine's
        children past the first are its leaves, kept aside (`finish`)."""
        new_nodes = []
        for row, (parent, toks) in enumerate(zip(parents, children)):
            base = 0.0 if parent < 0 else self.logcum[parent]
            if self.spine:
                self.leaves += [(parent, int(tok)) for tok in toks[1:]]
                toks = toks[:1]
            for tok in toks:
                new_nodes.append(len(self.tokens))
                self.tokens.append(int(tok))
                self.parents.append(parent)
                self.logcum.append(base if q is None
                                   else base + math.log(max(float(q[row, tok]), 1e-30)))
        return new_nodes

    def _counts(self, parents: list[int], q: torch.Tensor) -> list[int]:
        """Children per parent, decided from the parents' paths and distributions only."""
        room = self._room()
        depth = 0 if parents == [-1] else self.depth + 1
        if self.spine:  # one parent: the spine's node, then its leaves
            n = self._leaf_count(parents[0], q[0].numpy())
            return [min(1 + n, int((q[0] > 0).sum())) if room > 0 else 0]
        if self.spec.kind == "chain":
            return [min(1, room)] * len(parents)
        if self.spec.kind == "static":
            want = self.spec.branching[depth]
            counts = []
            for _ in parents:
                counts.append(max(0, min(want, room)))
                room -= counts[-1]
            return counts
        return self._dynamic_counts(parents, q, min(room, self.width))

    def _dynamic_counts(self, parents: list[int], q: torch.Tensor, budget: int) -> list[int]:
        """Best `budget` (parent, rank) pairs by parent logcum + log of the rank-th probability."""
        k = min(budget, q.shape[-1])
        top = torch.topk(q, k, dim=-1).values.clamp_min(1e-30).log()  # [P, k]
        base = torch.tensor([0.0 if p < 0 else self.logcum[p] for p in parents])  # [P]
        scores = (base[:, None] + top).flatten()  # [P * k]
        support = (q > 0).sum(-1)  # [P], sampling cannot draw more than the support
        counts = [0] * len(parents)
        for flat in torch.argsort(scores, descending=True)[:budget].tolist():
            row = flat // k
            if counts[row] < int(support[row]):
                counts[row] += 1
        return counts

    def sparse_dists(self) -> list[tuple[np.ndarray, np.ndarray] | None]:
        """Per row (0 = root, i + 1 = node i) the sparse distribution its children came from."""
        if self.sampling.greedy:
            return []
        return [self.dists.get(r) for r in range(len(self.tokens) + 1)]
