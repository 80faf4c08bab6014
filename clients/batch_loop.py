"""The client's engine loop: schedule -> propose -> verify -> commit, once per round.

Every running sequence takes part in every round (continuous batching: the scheduler admits and
retires sequences between rounds). A round is built from its `StepPlan` alone: one ProposeBatch
and one VerifyBatch carry every planned sequence (and the ids whose state the services may free),
and the outcomes go back through one `update_from_output(plan, proposals, replies)`.

The loop owns the request state: callers `submit()` a request and read its round events from the
iterator it returns, and `cancel()` ends one early; nothing else touches the scheduler.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import grpc

from specmesh.clients.adaptive import AdaptiveSpeculation
from specmesh.clients.plan import SequenceDelta, SequenceRequest, StepPlan
from specmesh.clients.scheduled import chain_matched
from specmesh.clients.scheduler import Scheduler
from specmesh.clients.step import Stubs, propose_batch, verify_batch, verify_request
from specmesh.v1 import draft_pb2, verify_pb2
from specmesh.wire.errors import NotReady, error_from_rpc

log = logging.getLogger(__name__)
MAX_BACKOFF_S = 1.0


@dataclass(frozen=True)
class RoundEvent:
    """What one round gave one sequence (delivered to its request's iterator)."""

    tokens: tuple[int, ...]  # committed this round (already cut at EOS / max_new_tokens)
    finish_reason: str | None
    num_drafted: int
    num_accepted: int
    queue_s: float = 0.0  # on a sequence's first event: its wait from submission to a round


class PerRequestPolicy:
    """Adaptive budgets for the sequences that asked for them; the rest keep their tree."""

    def __init__(self):
        self.adaptive = AdaptiveSpeculation()
        self.adaptive_ids: set[str] = set()

    def choose(self, seq_id: str, batch_tokens: int, batch_size: int, draft_lag: int = 1,
               tokens_left: int | None = None) -> int:
        if seq_id not in self.adaptive_ids:
            return 1 << 30
        return self.adaptive.choose(seq_id, batch_tokens, batch_size, draft_lag, tokens_left)

    def forget(self, seq_id: str) -> None:
        self.adaptive_ids.discard(seq_id)
        self.adaptive.forget(seq_id)


class BatchLoop:
    def __init__(self, stubs: Stubs, scheduler: Scheduler, policy: PerRequestPolicy):
        self.stubs = stubs
        self.scheduler = scheduler
        self.policy = policy
        self._sinks: dict[str, Callable[[RoundEvent | BaseException], None]] = {}
        self._wake = asyncio.Event()
        self.backoff_s = 0.0
        self.outage_since: dict[str, float] = {}  # seq_id -> first unanswered Verify
        self._submitted: dict[str, float] = {}  # seq_id -> submission time, until it runs
        self._queue_s: dict[str, float] = {}  # seq_id -> its queue wait, until delivered

    # -- requests in and out ---------------------------------------------------------------
    async def submit(self, request: SequenceRequest, adaptive: bool = False
                     ) -> AsyncIterator[RoundEvent]:
        """Queue a request; yield its round events until one finishes it (a failure raises).
        Leaving the iterator early cancels the request."""
        queue: asyncio.Queue[RoundEvent | BaseException] = asyncio.Queue()
        seq_id = request.request_id
        self.scheduler.add(request)
        self._sinks[seq_id] = queue.put_nowait
        self._submitted[seq_id] = time.perf_counter()
        if adaptive:
            self.policy.adaptive_ids.add(seq_id)
        self._wake.set()
        try:
            while True:
                event = await queue.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            self._sinks.pop(seq_id, None)
            self._submitted.pop(seq_id, None)
            self._queue_s.pop(seq_id, None)
            self.cancel(seq_id)

    def cancel(self, seq_id: str, reason: str = "cancelled") -> None:
        """End a request now (a stop string seen, its caller gone); a no-op once it ended."""
        if seq_id in self.scheduler:
            self.scheduler.finish(seq_id, reason)
            self._wake.set()

    def _deliver(self, seq_id: str, event: RoundEvent | BaseException) -> None:
        sink = self._sinks.get(seq_id)
        if sink is not None:
            sink(event)

    def _fail(self, seq_id: str, exc: BaseException) -> None:
        self.scheduler.finish(seq_id, "error")
        self._deliver(seq_id, exc)

    def _fail_all(self, exc: BaseException) -> None:
        """Every submitted request gets `exc` (the scheduler's state is in doubt: each one is
        also dropped from it where it still can be). Had the loop task died instead, they
        would all have waited forever, and every later request too."""
        for seq_id in list(self._sinks):
            self._deliver(seq_id, exc)
            try:
                if seq_id in self.scheduler:
                    self.scheduler.finish(seq_id, "error")
            except Exception:  # noqa: BLE001 - already failed; nothing more to do for it
                log.exception("could not drop %s from the scheduler", seq_id)

    # -- the rounds ------------------------------------------------------------------------
    async def run(self) -> None:
        """Forever: wait for work, run one round."""
        while True:
            if not self.scheduler.has_work:
                self._wake.clear()
                await self._wake.wait()
            try:
                plan = self.scheduler.schedule()
            except Exception as exc:  # noqa: BLE001 - a bug fails the requests, not the loop
                log.exception("scheduling failed: failing every queued and running request")
                self._fail_all(exc)
                self.backoff_s = min(max(self.backoff_s * 2, 0.01), MAX_BACKOFF_S)
                await asyncio.sleep(self.backoff_s)  # a bug that persists: no hot loop
                continue
            if plan.is_empty:
                await self._release(plan.finished_sequence_ids)
                if self.scheduler.num_waiting:  # all requeued: wait for room
                    await asyncio.sleep(max(self.backoff_s, 0.01))
                continue
            try:
                await self.run_round(plan)
            except Exception as exc:  # noqa: BLE001 - a bug must fail its round, not the loop
                log.exception("round failed")
                for seq_id in plan.sequence_ids:
                    if seq_id in self.scheduler:
                        self._fail(seq_id, exc)
            if self.backoff_s:
                await asyncio.sleep(self.backoff_s)

    async def run_round(self, plan: StepPlan) -> None:
        """One ProposeBatch and one VerifyBatch for every sequence of the plan; the finished ids
        ride on both."""
        steps = plan.deltas()
        finished = plan.finished_sequence_ids
        now = time.perf_counter()
        for new in plan.new:
            if new.seq_id in self._submitted:
                self._queue_s[new.seq_id] = now - self._submitted.pop(new.seq_id)
        drafting = [d for d in steps if d.spec.enabled]
        t0 = time.perf_counter()
        proposed = await propose_batch(self.stubs, drafting, finished)
        t1 = time.perf_counter()
        by_seq = {d.seq_id: self._usable(d.seq_id, p) for d, p in zip(drafting, proposed)}
        proposals = [by_seq.get(d.seq_id) for d in steps]
        depth = max((_depth(p) for p in proposals), default=0)
        rows = _steady_rows(drafting, proposed)
        if depth and rows and all(_is_chain(p) for p in proposals if p is not None):
            # the policy sizes chains: a wider tree's round (another mode's sequence) would
            # teach it a draft cost per depth that its chains never pay
            self.policy.adaptive.observe_draft(depth, t1 - t0, rows)
        # a sequence may have ended meanwhile (stop string seen, stream closed): skip it
        todo = [i for i, (d, p) in enumerate(zip(steps, proposals))
                if not _is_error(p) and d.seq_id in self.scheduler]
        replies = await verify_batch(self.stubs, [verify_request(steps[i], proposals[i])
                                                  for i in todo], finished)
        self.policy.adaptive.observe_verify(plan.num_batch_tokens, time.perf_counter() - t1)
        outcomes: list = [p if _is_error(p) else None for p in proposals]
        for i, reply in zip(todo, replies):
            outcomes[i] = reply
        self.update_from_output(steps, proposals, outcomes)

    def _usable(self, seq_id: str, proposal):
        """A draft that lost the sequence (NOT_FOUND) gets its full context next round; this
        round verifies without a tree (same output)."""
        if isinstance(proposal, grpc.aio.AioRpcError) \
                and proposal.code() == grpc.StatusCode.NOT_FOUND:
            self.scheduler.reset_remote(seq_id, "draft")
            return None
        return proposal

    def update_from_output(self, steps: Sequence[SequenceDelta], proposals: list,
                           outcomes: list) -> None:
        """Apply every planned sequence's outcome (a VerifyResponse, an error, or None when it
        was skipped), then set the backoff for the next round."""
        exhausted = False
        for d, proposal, outcome in zip(steps, proposals, outcomes):
            if outcome is None or d.seq_id not in self.scheduler:
                self.outage_since.pop(d.seq_id, None)  # ended meanwhile (stop, cancelled)
            elif isinstance(outcome, BaseException):
                exhausted |= self._failed(d.seq_id, outcome)
            else:
                self._commit(d.seq_id, proposal, outcome)
        self.backoff_s = min(max(self.backoff_s * 2, 0.01), MAX_BACKOFF_S) if exhausted else 0.0

    def _failed(self, seq_id: str, err: BaseException) -> bool:
        """One sequence's error; True when the round should back off (the verifier was out of
        room or did not answer)."""
        if not isinstance(err, grpc.aio.AioRpcError):
            self._fail(seq_id, err)
            return False
        code = err.code()
        if code == grpc.StatusCode.NOT_FOUND:  # evicted: resend the full context there
            self.scheduler.reset_remote(seq_id, "target")
            return False
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return self._outage(seq_id, err)
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            # a batch sequence gives way to an interactive one; KV is freed with the next plan
            self.scheduler.preempt_for(seq_id)
            return True
        self._fail(seq_id, error_from_rpc(err))
        return False

    def _commit(self, seq_id: str, proposal, reply: verify_pb2.VerifyResponse) -> None:
        if self.outage_since.pop(seq_id, None) is not None and not self.outage_since:
            log.warning("verify service answering again")
        drafted = len(proposal.tree.tokens) if isinstance(proposal, draft_pb2.ProposeResponse) \
            else 0
        result = self.scheduler.commit(
            seq_id, list(reply.tokens), num_draft_tokens=drafted,
            num_accepted_tokens=reply.num_accepted_draft_tokens,
            draft_cached=proposal.num_cached_tokens if drafted else None,
            draft_matched=chain_matched(proposal.tree.tokens, proposal.tree.parents, reply.tokens,
                                        reply.num_accepted_draft_tokens) if drafted else None,
            target_cached=reply.num_cached_tokens)
        if drafted and seq_id in self.policy.adaptive_ids:
            self.policy.adaptive.observe_round(seq_id, _depth(proposal),
                                               reply.num_accepted_draft_tokens)
        self._deliver(seq_id, RoundEvent(result.appended, result.finish_reason, drafted,
                                         reply.num_accepted_draft_tokens,
                                         self._queue_s.pop(seq_id, 0.0)))

    def _outage(self, seq_id: str, err: grpc.aio.AioRpcError) -> bool:
        """The verify service did not answer: keep the sequence (the round is retried after a
        capped exponential backoff) until `retry_deadline_s`, then fail it clearly. Logs once
        per outage, not once per round."""
        now = time.monotonic()
        if not self.outage_since:
            log.warning("verify service %s (%s); retrying for up to %.0f s",
                        err.code().name, err.details(), self.stubs.retry_deadline_s)
        since = self.outage_since.setdefault(seq_id, now)
        if now - since < self.stubs.retry_deadline_s:
            return True
        self.outage_since.pop(seq_id, None)
        self._fail(seq_id, NotReady(
            f"verify service {err.code().name} for {now - since:.1f} s (retried with backoff): "
            f"{err.details()}"))
        return False

    async def _release(self, seq_ids: Sequence[str]) -> None:
        """Free state when no sequence runs (otherwise the ids ride on the round's RPCs)."""
        if not seq_ids:
            return
        calls = [self.stubs.verify.Release(
            verify_pb2.VerifyReleaseRequest(sequence_ids=list(seq_ids)), timeout=5)]
        if self.stubs.draft is not None:
            calls.append(self.stubs.draft.Release(
                draft_pb2.ReleaseRequest(sequence_ids=list(seq_ids)), timeout=5))
        for res in await asyncio.gather(*calls, return_exceptions=True):
            if isinstance(res, BaseException):
                log.debug("release failed: %s", res)


def _is_error(proposal) -> bool:
    return isinstance(proposal, BaseException)


def _is_chain(proposal) -> bool:
    """A proposal whose tree is one path (or an error / empty tree: no draft cost to learn)."""
    if not isinstance(proposal, draft_pb2.ProposeResponse):
        return True
    return all(p == i - 1 for i, p in enumerate(proposal.tree.parents))


def _steady_rows(drafting: Sequence[SequenceDelta], proposed: Sequence) -> int | None:
    """The draft rows a round of chains fed (each sequence its new tokens, then one row per
    depth after the first), or None when a sequence fed more than two new tokens: a prompt's
    or a catch-up's rows run in one forward, far cheaper than a depth's, and the policy learns
    the steady state's cost per row (it prices a catch-up at that, on the safe side)."""
    fed = [len(d.draft_new_tokens) for d in drafting]
    if max(fed, default=0) > 2:
        return None
    return sum(n - 1 + _depth(p) for n, p in zip(fed, proposed) if _depth(p))


def _depth(proposal) -> int:
    if not isinstance(proposal, draft_pb2.ProposeResponse) or not proposal.tree.parents:
        return 0
    depths: list[int] = []
    for p in proposal.tree.parents:
        depths.append(0 if p < 0 else depths[p] + 1)
    return max(depths) + 1
