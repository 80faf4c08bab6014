"""Sampling and speculative acceptance math: pure functions over explicit `torch.Generator`s.

Vocabulary (the one definition used everywhere in specmesh):

- **draft tokens**: the nodes of the draft tree. The children of a node (or of the root, the last
  committed token) are the draft's candidates for the next token there. When sampling they were
  drawn from the draft distribution q of that node *without replacement*, and they appear in the
  tree in the order they were drawn (`sample_without_replacement` gives that order). A child
  whose q is 0 cannot have been drawn from q; it is a *fixed* candidate (e.g. `top_k_children`
  of a dynamic tree, or a draft that sent no distribution: an all-zero q row).
- **accepted tokens**: the draft tokens the verifier keeps: a path from the root down the tree.
  Walking from the root, at each node one child is accepted and walked into (sampling: the first
  child, in order, to pass the recursive rejection rule of `tree_rejection_sample`; greedy: the
  child equal to the target argmax at the node, the one leading deepest if siblings repeat a
  token). The walk stops at the first node where no child is accepted or that has no children.
- **recovered token**: the token appended when the walk stopped at a node that *has* children but
  none was accepted: drawn from the residual target distribution left after rejecting them all
  (greedy: the target argmax at that node, which differs from every child).
- **bonus token**: the token appended when the walk stopped at a node with *no* children (a leaf
  was accepted, or the tree is empty): drawn from that node's unmodified target distribution
  (greedy: its argmax).

Every round therefore emits `len(accepted) + 1` tokens, and exactly one of recovered/bonus.

Sampling acceptance (Recursive Speculative Decoding, Jeon et al. 2024; SpecInfer's multi-step
speculative sampling; with one child per node it is the speculative sampling of Leviathan et al.
and Chen et al. 2023). At a node with target p and draft q, for each child x in order:

- q(x) > 0 (x was drawn from q): accept with probability min(1, p(x) / q(x)); on rejection
  p <- normalize(max(p - q, 0)) and q <- normalize(q with x zeroed) (the law of the next draw).
- q(x) = 0 (fixed candidate): accept with probability p(x); on rejection p <- normalize(p with x
  zeroed) and q is unchanged. This is speculative sampling with a point-mass proposal at x, exact
  for any candidate however it was chosen.
- If max(p - q, 0) is all zero then p == q and a rejection has probability 0; if rounding makes
  one happen anyway, the point-mass residual (p with x zeroed) is used.

Each step leaves the law of the emitted token equal to the p it started from, so the first token
of a round follows the target exactly, and by induction down the tree so does every later one.
The acceptance arithmetic runs in float64 with one uniform per child tried and one per draw.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from specmesh.kernels.tree import TreeBuffers

MIN_TEMPERATURE = 1e-5


class InvalidSampling(ValueError):
    """A sampling parameter is out of range: the caller's fault (the model-service edge turns
    it into InvalidRequest on `field`), unlike other ValueErrors here: broken invariants."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.field = f"sampling.{name}"
        self.problem = message


@dataclass(frozen=True)
class SamplingConfig:
    """How logits become the distribution a token is drawn from (HF transformers semantics)."""

    temperature: float = 0.0
    """Logits are divided by this; 0 (or below MIN_TEMPERATURE) means greedy (argmax)."""
    top_p: float = 1.0
    """Nucleus: keep the smallest set of most likely tokens whose mass is >= top_p; 1 = off."""
    top_k: int = 0
    """Keep the k most likely tokens (and any tied with the k-th); 0 = off."""

    @property
    def greedy(self) -> bool:
        """Below MIN_TEMPERATURE the warped distribution is the argmax's one-hot up to float
        rounding (and dividing by it overflows), so such temperatures decode greedily, as in
        vLLM."""
        return self.temperature < MIN_TEMPERATURE

    def validate(self) -> None:
        """Raise InvalidSampling (a ValueError) naming the field when a value is out of range."""
        if not (self.temperature >= 0.0 and self.temperature != float("inf")):
            raise InvalidSampling("temperature", f"temperature must be a finite number >= 0 "
                                  f"(0 = greedy), got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidSampling("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, numbers.Integral) \
                or self.top_k < 0:
            raise InvalidSampling("top_k", f"top_k must be an integer >= 0 (0 = off), "
                                  f"got {self.top_k!r}")


def warp_logits_to_probs(
    logits: torch.Tensor,  # [N, V]
    cfg: SamplingConfig,
) -> torch.Tensor:  # [N, V] float32
    """Temperature, then top-k, then top-p, then softmax: the same numbers as HF transformers'
    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper and a softmax. Greedy gives the
    one-hot of the argmax (first index on ties)."""
    cfg.validate()
    if logits.dim() != 2:
        raise ValueError(f"logits must be [num_rows, vocab_size], got shape {tuple(logits.shape)}")
    scores = logits.float()  # [N, V]
    if cfg.greedy:
        probs = torch.zeros_like(scores)  # [N, V]
        return probs.scatter_(1, scores.argmax(dim=-1, keepdim=True), 1.0)
    if cfg.temperature != 1.0:
        scores = scores / cfg.temperature  # [N, V]
    if cfg.top_k > 0:
        k = min(cfg.top_k, scores.shape[-1])
        kth = torch.topk(scores, k)[0][..., -1, None]  # [N, 1]
        scores = scores.masked_fill(scores < kth, float("-inf"))  # [N, V]
    if cfg.top_p < 1.0:
        sorted_scores, sorted_idx = torch.sort(scores, descending=False)  # [N, V] each
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)  # [N, V]
        sorted_remove = cumulative <= (1 - cfg.top_p)  # [N, V] the low tail holding <= 1 - top_p
        sorted_remove[..., -1:] = False  # always keep the most likely token
        remove = sorted_remove.scatter(1, sorted_idx, sorted_remove)  # [N, V]
        scores = scores.masked_fill(remove, float("-inf"))  # [N, V]
    return scores.softmax(dim=-1)  # [N, V]


def _uniforms(
    n: int, generator: torch.Generator, device: torch.device
) -> torch.Tensor:  # [n] float64 in [0, 1)
    """Uniforms from `generator` (drawn on its own device), moved to `device`."""
    u = torch.rand(n, generator=generator, device=generator.device, dtype=torch.float64)  # [n]
    return u.to(device)


def _inverse_cdf(
    probs: torch.Tensor,  # [N, V] non-negative, rows with positive mass, need not sum to 1
    u: torch.Tensor,  # [N] float64 in [0, 1)
) -> torch.Tensor:  # [N] int64
    """The token whose CDF interval holds u * row mass; never a zero-probability token."""
    cdf = probs.double().cumsum(dim=-1)  # [N, V]
    total = cdf[:, -1:]  # [N, 1]
    x = torch.minimum(u[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))  # [N, 1]
    return torch.searchsorted(cdf, x, right=True).squeeze(1)  # [N]


def sample(
    probs: torch.Tensor,  # [N, V] non-negative; rows are normalized here
    generator: torch.Generator,
) -> torch.Tensor:  # [N] int64
    """One token per row by inverse CDF, one uniform per row."""
    if probs.dim() != 2:
        raise ValueError(f"probs must be [num_rows, vocab_size], got shape {tuple(probs.shape)}")
    if bool((probs.sum(dim=-1) <= 0).any()):
        raise ValueError("probs has a row with no probability mass")
    return _inverse_cdf(probs, _uniforms(probs.shape[0], generator, probs.device))


def sample_without_replacement(
    probs: torch.Tensor,  # [V] non-negative
    k: int,
    generator: torch.Generator,
) -> torch.Tensor:  # [k'] int64, k' = min(k, number of tokens with probs > 0), in draw order
    """k sequential draws, each from the mass left after removing the earlier ones.

    Done in one vector op as an exponential race: token v finishes at E_v / p_v with E_v ~ Exp(1);
    the first to finish is v with probability p_v / sum(p) and, by memorylessness, the next ones
    are sequential draws from the rest (Gumbel-top-k / Plackett-Luce)."""
    if probs.dim() != 1:
        raise ValueError(f"probs must be [vocab_size], got shape {tuple(probs.shape)}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    p = probs.double()  # [V]
    num = min(k, int((p > 0).sum()))
    e = torch.empty(p.shape[0], device=generator.device, dtype=torch.float64)  # [V]
    finish = e.exponential_(generator=generator).to(p.device) / p  # [V] inf where p == 0
    return torch.topk(finish, num, largest=False, sorted=True).indices  # [k']


def top_k_children(
    probs: torch.Tensor,  # [V]
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # token ids [k'] int64, their probs [k']
    """Deterministic top-k (ties to the lower id), k' = min(k, number of tokens with probs > 0).
    Under sampling these children are fixed candidates (send a zero draft row for them)."""
    if probs.dim() != 1:
        raise ValueError(f"probs must be [vocab_size], got shape {tuple(probs.shape)}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    num = min(k, int((probs > 0).sum()))
    sorted_probs, sorted_ids = torch.sort(probs, descending=True, stable=True)  # [V] each
    return sorted_ids[:num], sorted_probs[:num]


@dataclass(frozen=True)
class Acceptance:
    """The outcome of verifying one tree (see the module docstring for the terms)."""

    accepted_nodes: list[int]  # tree node indices of the accepted path, root side first
    next_token: int  # the recovered or bonus token appended after them
    is_bonus: bool  # True: bonus (walk ended at a node without children); False: recovered

    @property
    def num_accepted(self) -> int:
        return len(self.accepted_nodes)

    def tokens(self, tree: TreeBuffers) -> list[int]:
        """The tokens this round emits: the accepted draft tokens, then the next token."""
        return [int(tree.tokens[i]) for i in self.accepted_nodes] + [self.next_token]


def greedy_accept(
    tree: TreeBuffers,
    target_argmax: torch.Tensor,  # [1 + n] int64: row 0 after the root, row i + 1 after node i
) -> Acceptance:
    """The deepest root path whose every token equals the target argmax at its parent (ties in
    depth go to the lower node index), then the target argmax after its last node."""
    n = tree.num_nodes
    if tuple(target_argmax.shape) != (1 + n,):
        raise ValueError(
            f"target_argmax must have shape [{1 + n}], got {tuple(target_argmax.shape)}")
    argmax = target_argmax.to(device="cpu", dtype=torch.int64)  # [1 + n]
    if n == 0:
        return Acceptance(accepted_nodes=[], next_token=int(argmax[0]), is_bonus=True)
    match = tree.tokens.cpu() == argmax[tree.parents.cpu() + 1]  # [n]
    on_path = ~(tree.ancestors.cpu() & ~match[None, :]).any(dim=1)  # [n] node and ancestors match
    if not bool(on_path.any()):
        return Acceptance(accepted_nodes=[], next_token=int(argmax[0]), is_bonus=False)
    depth = torch.where(on_path, tree.depths.cpu(), -1)  # [n]
    last = int(torch.argmax(depth))  # first index of the maximum
    return Acceptance(
        accepted_nodes=tree.path_to(last),
        next_token=int(argmax[last + 1]),
        is_bonus=not tree.children[last + 1],
    )


def _normalized(v: torch.Tensor) -> torch.Tensor | None:  # [V] -> [V], None when no mass
    total = v.sum().item()
    return v / total if total > 0.0 else None


def _row(probs: torch.Tensor, row: int, name: str) -> torch.Tensor:  # [V] float64, sums to 1
    p = _normalized(probs[row].double())  # [V]
    if p is None:
        raise ValueError(f"{name}[{row}] has no probability mass")
    return p


def _draw(p: torch.Tensor, u: float) -> int:  # p [V] float64 with mass; u in [0, 1)
    """Inverse CDF: never returns a token with p == 0."""
    cdf = p.cumsum(dim=0)  # [V]
    total = cdf[-1].item()
    return int(torch.searchsorted(cdf, min(u * total, math.nextafter(total, 0.0)), right=True))


def _try_children(
    p: torch.Tensor,  # [V] float64 target at this node, sums to 1
    q: torch.Tensor,  # [V] float64 draft at this node, sums to 1 or all zero
    child_tokens: list[int],
    u: list[float],  # one uniform per child
) -> tuple[int | None, torch.Tensor]:  # (index of the accepted child or None, final p [V])
    """Recursive rejection sampling over one node's children (rules in the module docstring)."""
    for i, x in enumerate(child_tokens):
        px, qx = p[x].item(), q[x].item()
        if qx > 0.0:  # x ~ q: accept with prob min(1, p(x) / q(x)); always when q(x) <= p(x)
            if u[i] * qx < px:
                return i, p
            residual = _normalized((p - q).clamp_(min=0.0))  # [V] None only when p == q
            q = q.clone()  # [V]
            q[x] = 0.0
            q_next = _normalized(q)  # [V] the law of the next sibling's draw
            q = q_next if q_next is not None else q  # all zero once q's support is used up
        else:  # x cannot come from q: a fixed candidate, accept with prob p(x)
            if u[i] < px:
                return i, p
            residual = None
        if residual is None:  # point-mass residual: p without x
            without_x = p.clone()  # [V]
            without_x[x] = 0.0
            residual = _normalized(without_x)
        p = residual if residual is not None else p  # None only if p(x) == 1: never rejected
    return None, p


def tree_rejection_sample(
    tree: TreeBuffers,
    target_probs: torch.Tensor,  # [1 + n, V] warped; row 0 at the root, row i + 1 after node i
    draft_probs: torch.Tensor,  # [1 + n, V] the law each node's children were drawn from
    generator: torch.Generator,
) -> Acceptance:
    """Lossless multi-candidate rejection sampling down the tree (rules in the module docstring).

    Rows need not be normalized. Draft rows of nodes without children are ignored, as are target
    rows the walk never reaches; an all-zero draft row makes that node's children fixed
    candidates. Randomness: one call to `generator` per node visited, k + 1 uniforms for a node
    with k children (one per child, one for a recovered token), 1 at a leaf (the bonus token)."""
    n = tree.num_nodes
    if target_probs.dim() != 2 or target_probs.shape[0] != 1 + n:
        raise ValueError(
            f"target_probs must have shape [{1 + n}, vocab_size], got {tuple(target_probs.shape)}"
        )
    if tuple(draft_probs.shape) != tuple(target_probs.shape):
        raise ValueError(f"draft_probs shape {tuple(draft_probs.shape)} != target_probs shape "
                         f"{tuple(target_probs.shape)}")
    tokens = tree.tokens.tolist()  # [n]
    accepted: list[int] = []
    node = -1  # the root: the last committed token
    while True:
        children = tree.children[node + 1]
        p = _row(target_probs, node + 1, "target_probs")  # [V] float64
        u = torch.rand(len(children) + 1, generator=generator, device=generator.device,
                       dtype=torch.float64).tolist()
        if not children:  # bonus: the unmodified target after the last accepted node
            return Acceptance(accepted, _draw(p, u[-1]), is_bonus=True)
        q = _normalized(draft_probs[node + 1].double())  # [V] float64
        q = q if q is not None else torch.zeros_like(p)  # [V]
        chosen, p = _try_children(p, q, [tokens[c] for c in children], u[:-1])
        if chosen is None:  # recovered: from what is left of p after every rejection
            return Acceptance(accepted, _draw(p, u[-1]), is_bonus=False)
        node = children[chosen]
        accepted.append(node)
