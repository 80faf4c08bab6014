"""A dynamic tree as a chain (the spine) plus leaves: the draft's next choices along it.

Where the draft's chains run through one C call (`kernels.cpu_chain`), a dynamic tree is
grown as its spine: the chain of the draft's first choices, `spec.depth` deep, fed causally at
the cost of a chain (no tree attention, no Python between the depths). At each spine depth the
draft's second and third choices at that point become leaves (siblings of the spine's node,
never fed to the draft) while the path to them is likely enough: rank r joins when
P(path to the parent) * q_(r) >= MIN_LEAF_SCORE, q_(r) the r-th largest probability of the
parent's distribution, until the tree has `spec.max_nodes` nodes (shallow depths first).

The count at a depth is decided from the parent's path and distribution only, never from that
depth's draw, so under sampling the children stay sequential draws without replacement (the
first to finish in the draft's exponential race: the spine's node, then the leaves) and the
verifier's rejection sampling stays lossless.

Why leaves only along the spine: this draft agrees with the target's first choice ~77% of the
time and, where it does not, the target's token is its second choice ~52% of the time; the
draft's probabilities understate that (its top-1 of <0.3 is right 51% of the time), so a
chain's deep nodes are worth more than a wide tree's second-level branches, and a full tree's
extra draft forwards (tree attention, one Python step a depth) cost more than they win on a CPU.
"""

from __future__ import annotations

import math

import numpy as np

from specmesh.draft_service import draft_sampling

MIN_LEAF_SCORE = 0.1  # a leaf is worth a verify row when its path is at least this likely
MAX_RANK = 2  # leaves per depth: the draft's second and third choices at most


def leaf_count(path_logp: float, q: np.ndarray, budget: int) -> int:
    """Leaves at one spine depth: path_logp the log-probability of the path to the parent,
    q [vocab] the parent's distribution, budget the nodes still free."""
    if budget <= 0:
        return 0
    ranks = min(MAX_RANK + 1, q.shape[0])
    top = np.partition(q, -ranks)[-ranks:][::-1]  # [ranks] the largest, descending
    path = math.exp(path_logp)
    n = 0
    for r in range(1, ranks):
        if n >= budget or top[r] <= 0.0 or path * float(top[r]) < MIN_LEAF_SCORE:
            break
        n += 1
    return n


def greedy_leaves(q: np.ndarray, spine_token: int, n: int) -> list[int]:
    """The draft's next n choices after the spine's token, by probability (q [vocab])."""
    if n <= 0:
        return []
    top = np.argpartition(-q, n)[:n + 1]  # [n + 1] the n + 1 largest, unordered
    top = top[np.argsort(-q[top], kind="stable")]
    return [int(t) for t in top if t != spine_token][:n]


def sampled_leaves(q: np.ndarray, expo: np.ndarray, spine_token: int, n: int) -> list[int]:
    """The next n finishers of the exponential race the spine's token won (q [vocab] the fp16
    distribution drawn from, expo [vocab] its exponentials): draws without replacement."""
    if n <= 0:
        return []
    order = draft_sampling.finishers(expo, q, n + 1)
    return [int(t) for t in order if t != spine_token][:n]
