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

Priority classes (clients/priority.py): the queue is ordered by (class, arrival), so interactive
requests are admitted before any batch one; an interactive request that finds no slot takes the
latest batch sequence's (preempted by recompute). Interactive sequences are planned first;
running batch sequences fill what is left, at most `batch.max_round_tokens` while interactive
work is recent (`interactive_window_rounds`; least recently run first, the others sit the round
out with their KV kept), and draft budgets go to interactive sequences first.
"""

from __future__ import annotations

import bisect
import collections
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from specmesh.clients.plan import (
    CommitResult,
    NewSequence,
    SequenceDelta,
    SequenceRequest,
    StepPlan,
)
from specmesh.clients.priority import DEFAULT_BATCH, ClassLimits
from specmesh.clients.scheduled import ScheduledSequence, cut, delta, finish_reason, fit
from specmesh.errors import CapacityExhausted

__all__ = ["CommitResult", "NewSequence", "ScheduledSequence", "Scheduler", "SchedulerConfig",
           "SequenceDelta", "SequenceRequest", "SpecPolicy", "StepPlan"]

Side = Literal["draft", "target", "both"]


class SpecPolicy(Protocol):
    """Chooses each sequence's draft budget (e.g. clients.adaptive.AdaptiveSpeculation)."""

    def choose(self, seq_id: str, batch_tokens: int, batch_size: int, draft_lag: int = 1,
               tokens_left: int | None = None) -> int: ...

    def forget(self, seq_id: str) -> None: ...


@dataclass(frozen=True)
class SchedulerConfig:
    max_running: int = 64
    """Most sequences in one round."""
    max_batch_tokens: int = 2048
    """Most target tokens in one round (step tokens + draft budgets)."""
    relax_after_steps: int = 32
    """Rounds without RESOURCE_EXHAUSTED before the admission cap it set grows by one."""
    interactive: ClassLimits = ClassLimits()
    """Limits of the interactive class (a dict from a config file is accepted)."""
    batch: ClassLimits = DEFAULT_BATCH
    """Limits of the batch class."""
    interactive_window_rounds: int = 100
    """Batch sequences keep to `batch.max_round_tokens` for this many rounds after the last
    round with interactive work (then they get whole rounds again)."""

    def __post_init__(self):
        for name in ("max_running", "max_batch_tokens", "relax_after_steps",
                     "interactive_window_rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: {getattr(self, name)} must be >= 1")
        for name in ("interactive", "batch"):
            object.__setattr__(self, name, ClassLimits.coerce(getattr(self, name)))

    def limits(self, priority: str) -> ClassLimits:
        return self.interactive if priority == "interactive" else self.batch


class Scheduler:
    def __init__(self, config: SchedulerConfig | None = None, policy: SpecPolicy | None = None):
        self.config = config or SchedulerConfig()
        self.policy = policy
        self._arrivals = itertools.count()
        self._seqs: dict[str, ScheduledSequence] = {}
        self._waiting: list[tuple[int, int, str]] = []  # sorted by ScheduledSequence.queue_key
        self._running: dict[str, None] = {}  # insertion (admission) order
        self._finished: list[str] = []
        self._soft_cap: int | None = None  # learned from RESOURCE_EXHAUSTED
        self._rounds_since_exhausted = 0
        self._round = 0
        self._last_interactive = -(1 << 30)  # the last round with interactive work
        self.preemptions: collections.Counter[str] = collections.Counter()  # by class

    # -- queries ---------------------------------------------------------------------------
    def get(self, seq_id: str) -> ScheduledSequence:
        return self._seqs[seq_id]

    def __contains__(self, seq_id: str) -> bool:
        return seq_id in self._seqs

    @property
    def waiting_ids(self) -> list[str]:
        return [s for *_, s in self._waiting]

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
    def num_in_class(self, priority: str, *, running: bool) -> int:
        ids = self._running if running else [s for *_, s in self._waiting]
        return sum(self._seqs[s].priority == priority for s in ids)

    def add(self, request: SequenceRequest) -> ScheduledSequence:
        """Queue a request (FIFO within its priority class); CapacityExhausted when its class's
        queue is full."""
        if request.request_id in self._seqs:
            raise ValueError(f"request_id: {request.request_id!r} is already scheduled")
        limit = self.config.limits(request.priority).max_queued
        if self.num_in_class(request.priority, running=False) >= limit:
            raise CapacityExhausted(f"priority: the {request.priority} queue is full "
                                    f"({limit} waiting); retry later")
        seq = ScheduledSequence(request, next(self._arrivals), list(request.prompt_token_ids))
        self._seqs[seq.seq_id] = seq
        bisect.insort(self._waiting, seq.queue_key)
        return seq

    def finish(self, seq_id: str, reason: str) -> ScheduledSequence:
        """Retire a waiting or running sequence; its id goes out in the next plan (once) if a
        service may hold state for it."""
        seq = self._seqs.pop(seq_id)
        seq.finish_reason = reason
        if seq_id in self._running:
            del self._running[seq_id]
        else:
            self._waiting.remove(seq.queue_key)
        if seq.was_scheduled:
            self._finished.append(seq_id)
        if self.policy is not None:
            self.policy.forget(seq_id)
        return seq

    # -- one round -------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        """Admit, pick who runs and their draft budgets, and describe the round."""
        self._relax_cap()
        self._round += 1
        inter = self._running_of("interactive")
        i_fresh, i_back = self._admit("interactive", self._tokens(inter), len(inter))
        inter += i_back
        used = self._tokens(inter + i_fresh)
        if inter or i_fresh or self._interactive_waiting():
            self._last_interactive = self._round
        # batch keeps to its share while interactive work is recent: the round in flight when
        # the next interactive request arrives is then a short one
        shared = self._round - self._last_interactive < self.config.interactive_window_rounds
        batch = self._batch_share(self.config.max_batch_tokens - used, shared)
        limit = self.config.max_batch_tokens  # batch admissions stay inside its share too
        if shared:
            limit = min(limit, used + self.config.batch.max_round_tokens)
        b_fresh, b_back = self._admit("batch", used + self._tokens(batch),
                                      len(inter) + len(i_fresh) + len(batch), limit)
        running, fresh = inter + batch + b_back, i_fresh + b_fresh
        planned = running + fresh
        step_tokens = self._tokens(planned)
        budgets = self._spec_budgets(planned, step_tokens, shared)
        for seq in planned:
            seq.was_scheduled = True
            seq.last_round = self._round
        finished, self._finished = tuple(self._finished), []
        self._rounds_since_exhausted += 1
        specs = [s.request.tree.scaled(b) for s, b in zip(planned, budgets)]
        return StepPlan(
            new=tuple(NewSequence(s.seq_id, tuple(s.token_ids), spec, s.request.sampling)
                      for s, spec in zip(fresh, specs[len(running):])),
            running=tuple(delta(s, spec) for s, spec in zip(running, specs)),
            finished_sequence_ids=finished,
            spec_lengths=tuple((s.seq_id, b) for s, b in zip(planned, budgets)),
            num_batch_tokens=step_tokens + sum(budgets),
        )

    def _interactive_waiting(self) -> bool:
        return bool(self._waiting) and self._seqs[self._waiting[0][-1]].priority == "interactive"

    def _running_of(self, priority: str) -> list[ScheduledSequence]:
        return [q for q in (self._seqs[s] for s in self._running) if q.priority == priority]

    @staticmethod
    def _tokens(seqs: list[ScheduledSequence]) -> int:
        return sum(s.num_step_tokens for s in seqs)

    def _batch_share(self, room: int, shared: bool) -> list[ScheduledSequence]:
        """Running batch sequences for this round: all of them when no interactive sequence
        runs; else those that fit what interactive work left (and `batch.max_round_tokens`),
        least recently run first. The rest sit the round out (their KV stays)."""
        running = self._running_of("batch")
        if not shared:
            return running
        room = min(room, self.config.batch.max_round_tokens)
        chosen, tokens = [], 0
        for seq in sorted(running, key=lambda s: (s.last_round, s.arrival)):
            if tokens + seq.num_step_tokens <= room:
                chosen.append(seq)
                tokens += seq.num_step_tokens
        return chosen

    def _admit(self, priority: str, tokens: int, num_planned: int, token_limit: int | None = None
               ) -> tuple[list[ScheduledSequence], list[ScheduledSequence]]:
        """FIFO admission within one class while its sequences head the queue; returns
        (first-time sequences, requeued ones coming back). An interactive sequence that finds
        no slot takes the latest batch sequence's."""
        fresh, back = [], []
        cap, limit = self.admission_cap, token_limit or self.config.max_batch_tokens
        class_cap = self.config.limits(priority).max_running
        in_class = len(self._running_of(priority))
        while self._waiting and in_class < class_cap:
            seq = self._seqs[self._waiting[0][-1]]
            if seq.priority != priority:
                break
            if len(self._running) >= cap and not (priority == "interactive"
                                                  and self._evict_batch()):
                break
            if num_planned > 0 and tokens + seq.num_step_tokens > limit:
                break  # strict FIFO: nobody overtakes the head
            self._waiting.pop(0)
            self._running[seq.seq_id] = None
            tokens += seq.num_step_tokens
            num_planned += 1
            in_class += 1
            (back if seq.was_scheduled else fresh).append(seq)
        return fresh, back

    def _evict_batch(self) -> bool:
        """Preempt (by recompute) the latest-arrived running batch sequence; False if none."""
        batch = self._running_of("batch")
        if not batch:
            return False
        victim = max(batch, key=lambda s: s.arrival)
        self.preemptions[victim.priority] += 1
        del self._running[victim.seq_id]
        bisect.insort(self._waiting, victim.queue_key)
        self.reset_remote(victim.seq_id, "both")
        self._finished.append(victim.seq_id)
        return True

    def _spec_budgets(self, planned: list[ScheduledSequence], step_tokens: int,
                      shared: bool) -> list[int]:
        """Each sequence's draft budget (policy, request, tokens left), cut to the room the
        round has left: interactive sequences first, batch ones from what remains."""
        wanted = []
        # the policy judges the batch as it decodes: one token per sequence. A prompt's
        # tokens are a one-off the draft must prefill too (its cost model does not see that);
        # counted, they made drafting look free beside them, so a batch that never drafts
        # afterwards drafted on its first round (c=16: a 29 ms draft prefill and 16 x k rows)
        steady = len(planned)
        for seq in planned:
            left = seq.request.max_new_tokens - seq.num_generated
            k = seq.request.max_spec_tokens
            if self.policy is not None and k > 0:
                lag = len(seq.token_ids) - seq.draft_cached  # tokens its draft has not seen
                k = min(k, self.policy.choose(seq.seq_id, steady, len(planned), lag, left))
            wanted.append(max(0, min(k, left - 1)))  # a round yields up to k + 1 tokens
        room = max(0, self.config.max_batch_tokens - step_tokens)
        first = [i for i, s in enumerate(planned) if s.priority == "interactive"]
        rest = [i for i, s in enumerate(planned) if s.priority != "interactive"]
        out = [0] * len(planned)
        for i, b in zip(first, fit([wanted[i] for i in first], room)):
            out[i] = b
        room -= sum(out)
        if shared:
            batch_steps = self._tokens([planned[i] for i in rest])
            room = min(room, max(0, self.config.batch.max_round_tokens - batch_steps))
        for i, b in zip(rest, fit([wanted[i] for i in rest], room)):
            out[i] = b
        return out

    def preempt_for(self, seq_id: str) -> str:
        """RESOURCE_EXHAUSTED for `seq_id`: preempt the latest batch sequence instead when it is
        interactive (it stays and retries next round), else `seq_id` itself; returns who."""
        seq = self._seqs[seq_id]
        batch = [s for s in self._running_of("batch") if s.seq_id != seq_id]
        victim = seq_id
        if seq.priority == "interactive" and batch:
            victim = max(batch, key=lambda s: s.arrival).seq_id
        self.preempt(victim)
        return victim

    # -- results of a round ----------------------------------------------------------------
    def commit(self, seq_id: str, tokens: Sequence[int], *, num_draft_tokens: int = 0,
               num_accepted_tokens: int = 0, draft_cached: int | None = None,
               draft_matched: int | None = None,
               target_cached: int | None = None) -> CommitResult:
        """Append a verified round's tokens (accepted drafts + one bonus/recovered token).

        Cached counts default to what the protocol implies: the target holds KV for every token
        but the last (the bonus token has not been through it); the draft, if it proposed
        (num_draft_tokens > 0), holds the tokens it was sent, i.e. all tokens before this
        append. Pass the services' reported counts to override: a draft that kept its chain's
        nodes reports them too, and of those only the accepted ones are the sequence's
        (`draft_matched` of them where an accepted node lay off that chain: a dynamic tree's).
        Cuts after EOS (unless ignore_eos) and at max_new_tokens, and then retires the sequence.
        """
        seq = self._seqs[seq_id]
        if seq_id not in self._running:
            raise ValueError(f"sequence {seq_id!r} is not running")
        before = len(seq.token_ids)
        kept = cut(seq, list(tokens))
        seq.token_ids.extend(kept)
        seq.num_rounds += 1
        seq.num_draft_tokens += num_draft_tokens
        seq.num_accepted_tokens += num_accepted_tokens
        if draft_cached is not None:
            matched = num_accepted_tokens if draft_matched is None else draft_matched
            seq.draft_cached = min(draft_cached, before + matched)
        elif num_draft_tokens > 0:
            seq.draft_cached = before
        seq.target_cached = len(seq.token_ids) - 1 if target_cached is None else target_cached
        seq.draft_cached = min(seq.draft_cached, len(seq.token_ids))
        seq.target_cached = min(seq.target_cached, len(seq.token_ids))
        reason = finish_reason(seq, kept)
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
        bisect.insort(self._waiting, seq.queue_key)
        cap = max(1, len(self._running))
        self._soft_cap = cap if self._soft_cap is None else min(self._soft_cap, cap)
        self._rounds_since_exhausted = 0

    def preempt(self, seq_id: str) -> None:
        """Preempt by recompute (as vLLM does) after RESOURCE_EXHAUSTED: requeue it, free its
        KV on both services (its id goes out with the next plan's finished ids) and resend the
        full context when it is admitted again."""
        self.requeue(seq_id)
        self.preemptions[self._seqs[seq_id].priority] += 1
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
