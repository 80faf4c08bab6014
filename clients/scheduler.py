"""Iteration-level (Orca-style) scheduler: admit and retire sequences every round (pure, no I/O).

The client loop is
    plan = scheduler.schedule()               # who runs this round, with what
    ... Propose / Verify for every sequence of the plan, in one batch ...
    scheduler.commit(seq_id, tokens, ...)     # or preempt / reset_remote / finish
and `StepPlan` (clients/plan.py) is the only contract between the scheduler and the code that
calls the services:
each planned sequence carries both services' headers (new sequences their full token ids once,
running ones deltas against what each service already holds), this round's tree (scaled to its
draft budget) and its sampling; `finished_sequence_ids` lets the services free state in the same
call (sequences that ended, and preempted ones whose KV must go).

Budget: a sequence's step tokens are the tokens the target must take in this round besides the
draft (its uncached suffix). Running sequences always run; waiting ones are admitted in FIFO order
while fewer than `max_running` run and the step tokens still fit `max_batch_tokens` (the head of
the queue runs alone if nothing else runs, however long). Draft budgets (`spec_lengths`) come
from the policy, capped per request and by the tokens left to generate, and are then cut to the
room the batch has left, so speculation never displaces a sequence. After a RESOURCE_EXHAUSTED
(`requeue`) admissions stop at the number that still ran until `relax_after_steps` rounds pass
without another one (then one more is allowed, and so on).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from specmesh.clients.plan import (
    CommitResult,
    NewSequence,
    SequenceDelta,
    SequenceRequest,
    StepPlan,
)
from specmesh.wire.tree_spec import TreeSpec

__all__ = ["CommitResult", "NewSequence", "ScheduledSequence", "Scheduler", "SchedulerConfig",
           "SequenceDelta", "SequenceRequest", "SpecPolicy", "StepPlan"]

Side = Literal["draft", "target", "both"]


class SpecPolicy(Protocol):
    """Chooses each sequence's draft budget (e.g. clients.adaptive.AdaptiveSpeculation)."""

    def choose(self, seq_id: str, batch_tokens: int, batch_size: int) -> int: ...

    def forget(self, seq_id: str) -> None: ...


@dataclass
class ScheduledSequence:
    """What the scheduler tracks per sequence."""

    request: SequenceRequest
    arrival: int  # admission order key (FIFO)
    token_ids: list[int] = field(default_factory=list)  # prompt + generated
    draft_cached: int = 0  # leading tokens whose KV the draft service holds
    target_cached: int = 0  # leading tokens whose KV the verify service holds
    num_rounds: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    finish_reason: str | None = None
    was_scheduled: bool = False  # a service may hold state for it

    @property
    def seq_id(self) -> str:
        return self.request.request_id

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - len(self.request.prompt_token_ids)

    @property
    def generated_token_ids(self) -> list[int]:
        return self.token_ids[len(self.request.prompt_token_ids):]

    @property
    def num_step_tokens(self) -> int:
        """Tokens the target must take in next round besides the draft."""
        return len(self.token_ids) - self.target_cached


@dataclass(frozen=True)
class SchedulerConfig:
    max_running: int = 64
    """Most sequences in one round."""
    max_batch_tokens: int = 2048
    """Most target tokens in one round (step tokens + draft budgets)."""
    relax_after_steps: int = 32
    """Rounds without RESOURCE_EXHAUSTED before the admission cap it set grows by one."""

    def __post_init__(self):
        for name in ("max_running", "max_batch_tokens", "relax_after_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: {getattr(self, name)} must be >= 1")


class Scheduler:
    def __init__(self, config: SchedulerConfig | None = None, policy: SpecPolicy | None = None):
        self.config = config or SchedulerConfig()
        self.policy = policy
        self._arrivals = itertools.count()
        self._seqs: dict[str, ScheduledSequence] = {}
        self._waiting: list[tuple[int, str]] = []  # sorted by arrival
        self._running: dict[str, None] = {}  # insertion (admission) order
        self._finished: list[str] = []
        self._soft_cap: int | None = None  # learned from RESOURCE_EXHAUSTED
        self._rounds_since_exhausted = 0

    # -- queries ---------------------------------------------------------------------------
    def get(self, seq_id: str) -> ScheduledSequence:
        return self._seqs[seq_id]

    def __contains__(self, seq_id: str) -> bool:
        return seq_id in self._seqs

    @property
    def waiting_ids(self) -> list[str]:
        return [s for _, s in self._waiting]

    @property
    def running_ids(self) -> list[str]:
        return list(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def admission_cap(self) -> int:
        """How many sequences may run now (max_running, or less after RESOURCE_EXHAUSTED)."""
        cap = self.config.max_running
        return cap if self._soft_cap is None else min(cap, self._soft_cap)

    @property
    def has_work(self) -> bool:
        """Anything to run or to release."""
        return bool(self._waiting or self._running or self._finished)

    # -- requests in and out ---------------------------------------------------------------
    def add(self, request: SequenceRequest) -> ScheduledSequence:
        """Queue a request (FIFO)."""
        if request.request_id in self._seqs:
            raise ValueError(f"request_id: {request.request_id!r} is already scheduled")
        seq = ScheduledSequence(request, next(self._arrivals), list(request.prompt_token_ids))
        self._seqs[seq.seq_id] = seq
        bisect.insort(self._waiting, (seq.arrival, seq.seq_id))
        return seq

    def finish(self, seq_id: str, reason: str) -> ScheduledSequence:
        """Retire a waiting or running sequence; its id goes out in the next plan (once) if a
        service may hold state for it."""
        seq = self._seqs.pop(seq_id)
        seq.finish_reason = reason
        if seq_id in self._running:
            del self._running[seq_id]
        else:
            self._waiting.remove((seq.arrival, seq_id))
        if seq.was_scheduled:
            self._finished.append(seq_id)
        if self.policy is not None:
            self.policy.forget(seq_id)
        return seq

    # -- one round -------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        """Admit, pick draft budgets, and describe the round."""
        self._relax_cap()
        running = [self._seqs[s] for s in self._running]
        fresh, back = self._admit(sum(s.num_step_tokens for s in running), len(running))
        running += back  # requeued sequences come back as deltas, not as new
        planned = running + fresh
        step_tokens = sum(s.num_step_tokens for s in planned)
        budgets = self._spec_budgets(planned, step_tokens)
        for seq in planned:
            seq.was_scheduled = True
        finished, self._finished = tuple(self._finished), []
        self._rounds_since_exhausted += 1
        specs = [s.request.tree.scaled(b) for s, b in zip(planned, budgets)]
        return StepPlan(
            new=tuple(NewSequence(s.seq_id, tuple(s.token_ids), spec, s.request.sampling)
                      for s, spec in zip(fresh, specs[len(running):])),
            running=tuple(_delta(s, spec) for s, spec in zip(running, specs)),
            finished_sequence_ids=finished,
            spec_lengths=tuple((s.seq_id, b) for s, b in zip(planned, budgets)),
            num_batch_tokens=step_tokens + sum(budgets),
        )

    def _admit(self, tokens: int, num_running: int
               ) -> tuple[list[ScheduledSequence], list[ScheduledSequence]]:
        """FIFO admission; returns (first-time sequences, requeued ones coming back)."""
        fresh, back = [], []
        cap = self.admission_cap
        while self._waiting and num_running < cap:
            seq = self._seqs[self._waiting[0][1]]
            if num_running > 0 and tokens + seq.num_step_tokens > self.config.max_batch_tokens:
                break  # strict FIFO: nobody overtakes the head
            self._waiting.pop(0)
            self._running[seq.seq_id] = None
            tokens += seq.num_step_tokens
            num_running += 1
            (back if seq.was_scheduled else fresh).append(seq)
        return fresh, back

    def _spec_budgets(self, planned: list[ScheduledSequence], step_tokens: int) -> list[int]:
        wanted = []
        for seq in planned:
            left = seq.request.max_new_tokens - seq.num_generated
            k = seq.request.max_spec_tokens
            if self.policy is not None and k > 0:
                k = min(k, self.policy.choose(seq.seq_id, step_tokens, len(planned)))
            wanted.append(max(0, min(k, left - 1)))  # a round yields up to k + 1 tokens
        room = max(0, self.config.max_batch_tokens - step_tokens)
        return _fit(wanted, room)

    # -- results of a round ----------------------------------------------------------------
    def commit(self, seq_id: str, tokens: Sequence[int], *, num_draft_tokens: int = 0,
               num_accepted_tokens: int = 0, draft_cached: int | None = None,
               target_cached: int | None = None) -> CommitResult:
        """Append a verified round's tokens (accepted drafts + one bonus/recovered token).

        Cached counts default to what the protocol implies: the target holds KV for every token
        but the last (the bonus token has not been through it); the draft, if it proposed
        (num_draft_tokens > 0), holds the tokens it was sent, i.e. all tokens before this
        append. Pass the services' reported counts to override. Cuts after EOS (unless
        ignore_eos) and at max_new_tokens, and then retires the sequence.
        """
        seq = self._seqs[seq_id]
        if seq_id not in self._running:
            raise ValueError(f"sequence {seq_id!r} is not running")
        before = len(seq.token_ids)
        kept = _cut(seq, list(tokens))
        seq.token_ids.extend(kept)
        seq.num_rounds += 1
        seq.num_draft_tokens += num_draft_tokens
        seq.num_accepted_tokens += num_accepted_tokens
        if draft_cached is not None:
            seq.draft_cached = draft_cached
        elif num_draft_tokens > 0:
            seq.draft_cached = before
        seq.target_cached = len(seq.token_ids) - 1 if target_cached is None else target_cached
        seq.draft_cached = min(seq.draft_cached, len(seq.token_ids))
        seq.target_cached = min(seq.target_cached, len(seq.token_ids))
        reason = _finish_reason(seq, kept)
        if reason is not None:
            self.finish(seq_id, reason)
        return CommitResult(tuple(kept), reason)

    def reset_remote(self, seq_id: str, side: Side) -> None:
        """A service answered NOT_FOUND: it holds nothing, so resend the full context there."""
        if side not in ("draft", "target", "both"):
            raise ValueError(f"side: {side!r} must be 'draft', 'target' or 'both'")
        seq = self._seqs[seq_id]
        if side in ("draft", "both"):
            seq.draft_cached = 0
        if side in ("target", "both"):
            seq.target_cached = 0

    def requeue(self, seq_id: str) -> None:
        """A service answered RESOURCE_EXHAUSTED: back to the waiting queue (ahead of everyone
        who arrived later), tokens kept; admissions are capped at the number still running."""
        seq = self._seqs[seq_id]
        if seq_id not in self._running:
            raise ValueError(f"sequence {seq_id!r} is not running")
        del self._running[seq_id]
        bisect.insort(self._waiting, (seq.arrival, seq_id))
        cap = max(1, len(self._running))
        self._soft_cap = cap if self._soft_cap is None else min(self._soft_cap, cap)
        self._rounds_since_exhausted = 0

    def preempt(self, seq_id: str) -> None:
        """Preempt by recompute (as vLLM does) after RESOURCE_EXHAUSTED: requeue it, free its
        KV on both services (its id goes out with the next plan's finished ids) and resend the
        full context when it is admitted again."""
        self.requeue(seq_id)
        self.reset_remote(seq_id, "both")
        self._finished.append(seq_id)

    def _relax_cap(self) -> None:
        """Grow the RESOURCE_EXHAUSTED cap by one every `relax_after_steps` quiet rounds."""
        if self._soft_cap is None:
            return
        if self._rounds_since_exhausted >= self.config.relax_after_steps:
            self._rounds_since_exhausted = 0
            self._soft_cap += 1
            if self._soft_cap >= self.config.max_running:
                self._soft_cap = None


def _delta(seq: ScheduledSequence, spec: TreeSpec) -> SequenceDelta:
    return SequenceDelta(seq.seq_id, seq.draft_cached, tuple(seq.token_ids[seq.draft_cached:]),
                         seq.target_cached, tuple(seq.token_ids[seq.target_cached:]), spec,
                         seq.request.sampling)


def _cut(seq: ScheduledSequence, tokens: list[int]) -> list[int]:
    """Keep tokens up to and including the first EOS, and no more than max_new_tokens."""
    req = seq.request
    tokens = tokens[: req.max_new_tokens - seq.num_generated]
    if req.eos_token_id is not None and not req.ignore_eos and req.eos_token_id in tokens:
        tokens = tokens[: tokens.index(req.eos_token_id) + 1]
    return tokens


def _finish_reason(seq: ScheduledSequence, kept: list[int]) -> str | None:
    req = seq.request
    if kept and req.eos_token_id is not None and not req.ignore_eos \
            and kept[-1] == req.eos_token_id:
        return "eos"
    if seq.num_generated >= req.max_new_tokens:
        return "length"
    return None


def _fit(wanted: list[int], room: int) -> list[int]:
    """Cut budgets to sum <= room: the largest level L with sum(min(w, L)) <= room, then the
    leftover one token each to the earliest that want more."""
    if sum(wanted) <= room:
        return wanted
    level = 0
    while sum(min(w, level + 1) for w in wanted) <= room:
        level += 1
    out = [min(w, level) for w in wanted]
    left = room - sum(out)
    for i, w in enumerate(wanted):
        if left == 0:
            break
        if w > level:
            out[i] += 1
            left -= 1
    return out
