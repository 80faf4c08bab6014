"""Adaptive speculation: how many draft tokens each sequence gets this round (pure, no I/O).

A chain of k draft tokens whose tokens are each accepted with probability `a` yields, with the
bonus token, E[tokens | k, a] = (1 - a^(k+1)) / (1 - a) per round. A round costs
draft_time(k) + verify_time(batch tokens), and the batch grows by k tokens per drafting sequence.
We pick the k in 0..k_max with the most expected tokens per second, where k = 0 is plain decoding
(no draft call, 1 token per verify_time(batch tokens)); speculation must beat it by `min_speedup`.
Under load verify time grows with tokens, so k shrinks, down to 0. A sequence held at 0 drafts
now and then anyway (after `explore_every` rounds, then backing off), at the depth the model
rates best among k >= 1: the measurement that can bring it back. (Exploring at k = 1 was a
trap wherever a draft call has a large fixed cost, as on a GPU: depth 1 is then the worst
depth, looks like it, and never wins.)

Measured, all as exponentially weighted moving averages:
- per sequence, acceptance a = accepted / tested draft positions (a round accepting m of depth d
  tested m + 1 positions if m < d, else d: the maximum-likelihood estimate for a chain);
- draft round time as a line in the draft rows the round fed (a batch of B chains of depth d,
  each fed its one new token, is B * d rows: one forward per depth over the whole batch);
- verify round time as a line in the verify batch's tokens.
A sequence whose draft has fallen behind (it decoded without drafting: its new tokens were never
fed to the draft) must catch up before it drafts again; that costs its lag in draft rows once,
and it drafts only when the time drafting saves over its remaining tokens beats that.
Trees: with `tree_width` w > 1 a budget of d * w nodes is verified at depth d; the acceptance
measured per depth then already includes the tree's alternatives. Budgets are in tokens (nodes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

_EPS = 1e-12


def expected_tokens(k: int, acceptance: float) -> float:
    """E[tokens per round] of a chain of k drafts with per-token acceptance a (bonus included)."""
    a = min(max(acceptance, 0.0), 1.0)
    if a >= 1.0 - 1e-12:
        return float(k + 1)
    return (1.0 - a ** (k + 1)) / (1.0 - a)


class LinearCost:
    """Time ≈ intercept + slope * x, fitted by exponentially weighted least squares.

    `decay` is the weight of the newest sample. With no spread in x yet, `fallback` decides:
    "constant" (slope 0: time does not depend on x) or "proportional" (intercept 0).
    """

    def __init__(self, decay: float, fallback: str = "constant"):
        if not 0 < decay <= 1:
            raise ValueError(f"decay: {decay} must be in (0, 1]")
        if fallback not in ("constant", "proportional"):
            raise ValueError(f"fallback: {fallback!r} must be 'constant' or 'proportional'")
        self.decay = decay
        self.fallback = fallback
        self.num_samples = 0
        self._w = self._x = self._y = self._xx = self._xy = 0.0

    def observe(self, x: float, y: float) -> None:
        keep, new = 1.0 - self.decay, self.decay
        self._w = keep * self._w + new
        self._x = keep * self._x + new * x
        self._y = keep * self._y + new * y
        self._xx = keep * self._xx + new * x * x
        self._xy = keep * self._xy + new * x * y
        self.num_samples += 1

    def coefficients(self) -> tuple[float, float] | None:
        """(intercept, slope), both >= 0; None before the first sample."""
        if self.num_samples == 0:
            return None
        mx, my = self._x / self._w, self._y / self._w
        var = self._xx / self._w - mx * mx
        if var > 1e-9 * max(1.0, mx * mx):
            slope = (self._xy / self._w - mx * my) / var
            intercept = my - slope * mx
            if slope < 0:  # noise: time does not grow with x
                return my, 0.0
            if intercept < 0:
                return 0.0, my / mx if mx > 0 else 0.0
            return intercept, slope
        if self.fallback == "proportional" and mx > _EPS:
            return 0.0, my / mx
        return my, 0.0

    def predict(self, x: float) -> float | None:
        coef = self.coefficients()
        if coef is None:
            return None
        return max(0.0, coef[0] + coef[1] * x)


@dataclass(frozen=True)
class AdaptiveConfig:
    k_max: int = 8
    """Largest draft depth ever chosen."""
    tree_width: int = 1
    """Draft nodes verified per depth (1 = chain); a budget is depth * tree_width tokens."""
    initial_k: int = 4
    """Depth used until both draft and verify times have been measured (at most k_max)."""
    prior_acceptance: float = 0.7
    """Acceptance assumed for the first sequence (later ones start from the global average)."""
    acceptance_decay: float = 0.1
    """EWMA weight of a sequence's newest round. At 0.3 (~6 rounds of memory) the estimate
    swung 0.46-0.93 within one story and the depth with it, 2 <-> 8, at a ~7% loss to the
    best fixed chain (simulated on recorded acceptances, then measured: README, "Adaptive
    speculation")."""
    rtt_decay: float = 0.1
    """EWMA weight of the newest draft / verify timing."""
    min_speedup: float = 1.05
    """Speculate only when expected tokens/s beats plain decoding by this factor."""
    explore_every: int = 8
    """A sequence held at k = 0 drafts after explore_every rounds there (0 = never), then after
    twice as many each time that did not bring it back, up to 16x: where drafting never pays
    (text the draft cannot predict) the explorations' cost fades to ~1/128 of the rounds."""

    def __post_init__(self):
        if self.k_max < 0:
            raise ValueError(f"k_max: {self.k_max} must be >= 0")
        if self.tree_width < 1:
            raise ValueError(f"tree_width: {self.tree_width} must be >= 1")
        if self.initial_k < 0:
            raise ValueError(f"initial_k: {self.initial_k} must be >= 0")
        if not 0 <= self.prior_acceptance <= 1:
            raise ValueError(f"prior_acceptance: {self.prior_acceptance} must be in [0, 1]")
        for name in ("acceptance_decay", "rtt_decay"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name}: {getattr(self, name)} must be in (0, 1]")
        if self.min_speedup <= 0:
            raise ValueError(f"min_speedup: {self.min_speedup} must be > 0")
        if self.explore_every < 0:
            raise ValueError(f"explore_every: {self.explore_every} must be >= 0")


@dataclass
class _Acceptance:
    """EW sums of accepted and tested draft positions; acceptance = accepted / tested."""

    accepted: float
    tested: float = 1.0

    @property
    def rate(self) -> float:
        return min(1.0, self.accepted / self.tested) if self.tested > _EPS else 0.0

    def observe(self, depth: int, num_accepted: int, decay: float) -> None:
        tested = num_accepted + (1 if num_accepted < depth else 0)
        self.accepted = (1 - decay) * self.accepted + decay * num_accepted
        self.tested = (1 - decay) * self.tested + decay * tested


@dataclass
class _SequenceState:
    acceptance: _Acceptance
    zero_streak: int = 0
    explore_gap: int = 0  # rounds at 0 before the next exploration (0: explore_every)


@dataclass
class AdaptiveSpeculation:
    """The policy: feed it measurements, ask it for a per-sequence draft budget each round."""

    config: AdaptiveConfig = field(default_factory=AdaptiveConfig)

    def __post_init__(self):
        self.draft_cost = LinearCost(self.config.rtt_decay, fallback="proportional")
        self.verify_cost = LinearCost(self.config.rtt_decay, fallback="proportional")
        self._global = _Acceptance(self.config.prior_acceptance)
        self._seqs: dict[str, _SequenceState] = {}
        # a batch's depth depends on (batch_tokens, batch_size) and the global state only:
        # computed once per round, dropped by the next measurement
        self._batch_depth: dict[tuple[int, int], int] = {}

    # -- measurements ----------------------------------------------------------------------
    def observe_round(self, seq_id: str, depth: int, num_accepted: int) -> None:
        """A verified round of `seq_id`: `num_accepted` of a draft of depth `depth` accepted."""
        if depth <= 0:
            return
        self._batch_depth.clear()
        num_accepted = min(max(num_accepted, 0), depth)
        decay = self.config.acceptance_decay
        state = self._seqs.get(seq_id)  # none after forget(): no state is recreated
        if state is not None:
            state.acceptance.observe(depth, num_accepted, decay)
        self._global.observe(depth, num_accepted, decay)

    def observe_draft(self, depth: int, seconds: float, rows: int | None = None) -> None:
        """One draft round trip that proposed chains of `depth` levels feeding `rows` draft rows
        in all (None: one sequence fed one new token, i.e. `depth` rows)."""
        if depth > 0:
            self._batch_depth.clear()
            self.draft_cost.observe(depth if rows is None else rows, seconds)

    def observe_verify(self, batch_tokens: int, seconds: float) -> None:
        """One verify round trip whose batch held `batch_tokens` tokens (drafts included)."""
        self._batch_depth.clear()
        self.verify_cost.observe(batch_tokens, seconds)

    def forget(self, seq_id: str) -> None:
        self._seqs.pop(seq_id, None)

    # -- queries ---------------------------------------------------------------------------
    def acceptance(self, seq_id: str) -> float:
        state = self._seqs.get(seq_id)
        return (state.acceptance if state else self._global).rate

    def depth(self, num_nodes: int) -> int:
        """The draft depth that a budget of `num_nodes` tokens stands for."""
        return math.ceil(num_nodes / self.config.tree_width)

    def tokens_per_second(self, seq_id: str, k: int, batch_tokens: int,
                          batch_size: int = 1) -> float | None:
        """Expected tokens/s of `seq_id` at depth k if all `batch_size` sequences drafted k
        (each fed one new token: the steady state); None before the costs have been measured.
        `batch_tokens` excludes draft tokens. In a batch every sequence is judged by the global
        acceptance, so all of them choose the same depth: a round pays the draft's latency if
        any one of them drafts."""
        verify_tokens = batch_tokens + batch_size * k * self.config.tree_width
        verify = self.verify_cost.predict(verify_tokens)
        draft = self.draft_cost.predict(batch_size * k) if k > 0 else 0.0
        if verify is None or draft is None:
            return None
        acceptance = self.acceptance(seq_id) if batch_size <= 1 else self._global.rate
        return expected_tokens(k, acceptance) / max(draft + verify, _EPS)

    def best_depth(self, seq_id: str, batch_tokens: int, batch_size: int = 1) -> int:
        """The depth with the most expected tokens/s (0 when speculation does not pay)."""
        if batch_size > 1:  # every sequence of a batch is judged alike (global acceptance)
            key = (batch_tokens, batch_size)
            if key not in self._batch_depth:
                self._batch_depth[key] = self._best_depth(seq_id, batch_tokens, batch_size)
            return self._batch_depth[key]
        return self._best_depth(seq_id, batch_tokens, batch_size)

    def _best_depth(self, seq_id: str, batch_tokens: int, batch_size: int) -> int:
        cfg = self.config
        plain = self.tokens_per_second(seq_id, 0, batch_tokens, batch_size)
        if plain is None or self.draft_cost.num_samples == 0:
            return min(cfg.initial_k, cfg.k_max)
        k, rate = self._best_drafting(seq_id, batch_tokens, batch_size)
        return k if rate > plain * cfg.min_speedup else 0

    def _best_drafting(self, seq_id: str, batch_tokens: int,
                       batch_size: int = 1) -> tuple[int, float]:
        """The depth >= 1 with the most expected tokens/s and that rate (1 and 0.0 while the
        costs are unknown, or with k_max 0)."""
        best_k, best_rate = 1, 0.0
        for k in range(1, self.config.k_max + 1):
            rate = self.tokens_per_second(seq_id, k, batch_tokens, batch_size) or 0.0
            if rate > best_rate:
                best_k, best_rate = k, rate
        return best_k, best_rate

    def catch_up_pays(self, seq_id: str, k: int, batch_tokens: int, batch_size: int,
                      draft_lag: int, tokens_left: int) -> bool:
        """Whether feeding the draft the `draft_lag` tokens it missed (once, beside the k rows
        of this round; as many for every sequence of the batch) costs less than drafting at
        depth k saves over the sequence's `tokens_left` tokens."""
        if draft_lag <= 1 or k <= 0:
            return True
        plain = self.tokens_per_second(seq_id, 0, batch_tokens, batch_size)
        spec = self.tokens_per_second(seq_id, k, batch_tokens, batch_size)
        extra = self.draft_cost.predict(batch_size * (draft_lag - 1 + k))
        steady = self.draft_cost.predict(batch_size * k)
        if not plain or not spec or extra is None or steady is None:
            return True  # costs unknown yet: the first rounds draft (initial_k)
        saved = tokens_left * (1.0 / plain - 1.0 / spec)
        return extra - steady < saved

    def choose(self, seq_id: str, batch_tokens: int, batch_size: int = 1, draft_lag: int = 1,
               tokens_left: int | None = None) -> int:
        """This round's draft budget in tokens (depth * tree_width) for `seq_id`, exploring
        every `explore_every` rounds spent at 0 when it runs alone (in a batch one sequence
        exploring would make the whole round wait for the draft). `draft_lag`: the tokens its
        draft has not seen (1 in the steady state: the verifier's last token); with
        `tokens_left` known, a longer lag drafts only where `catch_up_pays`."""
        k = self.best_depth(seq_id, batch_tokens, batch_size)
        if tokens_left is not None and not self.catch_up_pays(
                seq_id, k, batch_tokens, batch_size, draft_lag, tokens_left):
            k = 0
        state = self._state(seq_id)
        every = self.config.explore_every
        if k > 0:
            state.zero_streak, state.explore_gap = 0, every
        else:
            state.zero_streak += 1
            gap = state.explore_gap or every
            if every and batch_size <= 1 and state.zero_streak >= gap \
                    and self.config.k_max >= 1:
                state.zero_streak, state.explore_gap = 0, min(2 * gap, 16 * every)
                k = self._best_drafting(seq_id, batch_tokens)[0]
        return k * self.config.tree_width

    def _state(self, seq_id: str) -> _SequenceState:
        state = self._seqs.get(seq_id)
        if state is None:
            start = _Acceptance(self._global.rate)
            state = self._seqs[seq_id] = _SequenceState(start)
        return state
