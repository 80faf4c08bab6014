"""The client's engine loop: schedule -> propose -> verify -> commit, once per round.

Every running sequence takes part in every round (continuous batching: the scheduler admits and
retires sequences between rounds). Within a round all Propose calls go out together, then all
Verify calls, so each service's batcher sees them at once and runs one forward for the batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from clients.adaptive import AdaptiveSpeculation
from clients.scheduler import Scheduler, StepPlan
from clients.step import ProposeCall, Stubs, VerifyCall, propose_batch, verify_batch
from specmesh.v1 import common_pb2, draft_pb2, verify_pb2
from specmesh.wire.errors import NotReady, error_from_rpc
from specmesh.wire.tree_spec import TreeSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundEvent:
    """What one round gave one sequence (delivered to its request's sink)."""

    tokens: tuple[int, ...]  # committed this round (already cut at EOS / max_new_tokens)
    finish_reason: str | None
    num_drafted: int
    num_accepted: int


@dataclass
class SequenceContext:
    """Per-request facts the loop needs beyond the scheduler's state."""

    tree: TreeSpec
    sampling: common_pb2.SamplingParams
    adaptive: bool
    sink: Callable[[RoundEvent | BaseException], None]


class PerRequestPolicy:
    """Adaptive budgets for sequences that asked for them; the rest keep their tree."""

    def __init__(self, contexts: dict[str, SequenceContext]):
        self.adaptive = AdaptiveSpeculation()
        self._contexts = contexts

    def choose(self, seq_id: str, batch_tokens: int, batch_size: int) -> int:
        ctx = self._contexts.get(seq_id)
        if ctx is None or not ctx.adaptive:
            return 1 << 30
        return self.adaptive.choose(seq_id, batch_tokens, batch_size)

    def forget(self, seq_id: str) -> None:
        self.adaptive.forget(seq_id)


class BatchLoop:
    def __init__(self, stubs: Stubs, scheduler: Scheduler, contexts: dict[str, SequenceContext],
                 policy: PerRequestPolicy):
        self.stubs = stubs
        self.scheduler = scheduler
        self.contexts = contexts
        self.policy = policy
        self.wake = asyncio.Event()
        self.backoff_s = 0.0
        self.outage_since: dict[str, float] = {}  # seq_id -> first unanswered Verify

    async def run(self) -> None:
        """Forever: wait for work, run one round."""
        while True:
            if not self.scheduler.has_work:
                self.wake.clear()
                await self.wake.wait()
            plan = self.scheduler.schedule()
            if plan.is_empty:
                await self._release(plan.finished_sequence_ids)
                if self.scheduler.num_waiting:  # all requeued: wait for room
                    await asyncio.sleep(max(self.backoff_s, 0.01))
                continue
            try:
                await self.run_round(plan)
            except Exception as exc:  # noqa: BLE001 - a bug must fail its round, not the loop
                log.exception("round failed")
                self._fail_round(plan, exc)
            if self.backoff_s:
                await asyncio.sleep(self.backoff_s)

    async def run_round(self, plan: StepPlan) -> None:
        """One ProposeBatch and one VerifyBatch for every sequence of the plan; finished ids
        ride on both (or on a draft Release when no sequence speculates this round)."""
        deltas = plan.deltas()
        budgets = dict(plan.spec_lengths)
        finished = list(plan.finished_sequence_ids)
        specs = {d.seq_id: self.contexts[d.seq_id].tree.scaled(budgets[d.seq_id])
                 for d in deltas}
        drafting = [d.seq_id for d in deltas if specs[d.seq_id].enabled]
        if finished and (not drafting or self.stubs.draft is None):
            asyncio.get_running_loop().create_task(self._release(finished, verify_too=False))
        t0 = time.perf_counter()
        proposed = await propose_batch(self.stubs, [self._propose_call(s, specs[s])
                                                    for s in drafting], finished)
        t1 = time.perf_counter()
        by_seq = dict(zip(drafting, proposed))
        proposals = [by_seq.get(d.seq_id) for d in deltas]
        depth = max((self._depth(p) for p in proposals), default=0)
        if depth:
            self.policy.adaptive.observe_draft(depth, t1 - t0)
        # a sequence may have ended meanwhile (stop string seen, stream closed): skip it
        failed = {i: p for i, p in enumerate(proposals) if isinstance(p, BaseException)}
        todo = [i for i, d in enumerate(deltas) if i not in failed and d.seq_id in self.scheduler]
        calls = [self._verify_call(deltas[i].seq_id, proposals[i]) for i in todo]
        replies = dict(zip(todo, await verify_batch(self.stubs, calls, finished)
                           if calls else []))
        self.policy.adaptive.observe_verify(plan.num_batch_tokens, time.perf_counter() - t1)
        exhausted = False
        for i, (d, p) in enumerate(zip(deltas, proposals)):
            outcome = failed.get(i, replies.get(i))
            if outcome is not None:
                exhausted |= self._commit(d.seq_id, p, outcome)
        self.backoff_s = min(max(self.backoff_s * 2, 0.01), 1.0) if exhausted else 0.0

    def _fail_round(self, plan: StepPlan, exc: Exception) -> None:
        for seq_id in plan.sequence_ids:
            if seq_id in self.scheduler:
                self.scheduler.finish(seq_id, "error")
                self.contexts[seq_id].sink(exc)

    def _propose_call(self, seq_id: str, spec: TreeSpec) -> ProposeCall:
        seq = self.scheduler.get(seq_id)
        return ProposeCall(seq_id, seq.token_ids, seq.draft_cached, spec,
                           self.contexts[seq_id].sampling)

    def _verify_call(self, seq_id: str, proposal) -> VerifyCall:
        seq = self.scheduler.get(seq_id)
        return VerifyCall(seq_id, seq.token_ids, seq.target_cached, proposal,
                          self.contexts[seq_id].sampling)

    @staticmethod
    def _depth(proposal) -> int:
        if not isinstance(proposal, draft_pb2.ProposeResponse) or not proposal.tree.parents:
            return 0
        depths: list[int] = []
        for p in proposal.tree.parents:
            depths.append(0 if p < 0 else depths[p] + 1)
        return max(depths) + 1

    def _commit(self, seq_id: str, proposal, reply) -> bool:
        """Apply one sequence's outcome; True when the round should back off (the verifier was
        out of room or did not answer)."""
        if seq_id not in self.scheduler:  # finished meanwhile (stop string, cancelled)
            self.outage_since.pop(seq_id, None)
            return False
        ctx = self.contexts[seq_id]
        if isinstance(reply, grpc.aio.AioRpcError):
            code = reply.code()
            if code == grpc.StatusCode.NOT_FOUND:
                self.scheduler.reset_remote(seq_id, "target")  # evicted: resend full context
                return False
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return self._outage(seq_id, reply)
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                # preempt by recompute (as vLLM does): free its KV so the others can finish,
                # and resend the full context when it is admitted again
                self.scheduler.requeue(seq_id)
                self.scheduler.reset_remote(seq_id, "both")
                asyncio.get_running_loop().create_task(self._release([seq_id]))
                return True
            self.scheduler.finish(seq_id, "error")
            ctx.sink(error_from_rpc(reply))
            return False
        if isinstance(reply, BaseException):
            self.scheduler.finish(seq_id, "error")
            ctx.sink(reply)
            return False
        if self.outage_since.pop(seq_id, None) is not None and not self.outage_since:
            log.warning("verify service answering again")
        drafted = len(proposal.tree.tokens) if isinstance(proposal, draft_pb2.ProposeResponse) \
            else 0
        result = self.scheduler.commit(
            seq_id, list(reply.tokens), num_draft_tokens=drafted,
            num_accepted_tokens=reply.num_accepted_draft_tokens,
            draft_cached=proposal.num_cached_tokens if drafted else None,
            target_cached=reply.num_cached_tokens)
        if drafted and ctx.adaptive:
            self.policy.adaptive.observe_round(seq_id, self._depth(proposal),
                                               reply.num_accepted_draft_tokens)
        ctx.sink(RoundEvent(result.appended, result.finish_reason, drafted,
                            reply.num_accepted_draft_tokens))
        return False

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
        self.scheduler.finish(seq_id, "error")
        self.contexts[seq_id].sink(NotReady(
            f"verify service {err.code().name} for {now - since:.1f} s (retried with backoff): "
            f"{err.details()}"))
        return False

    async def _release(self, seq_ids, verify_too: bool = True) -> None:
        if not seq_ids:
            return
        calls = []
        if verify_too:
            calls.append(self.stubs.verify.Release(
                verify_pb2.VerifyReleaseRequest(sequence_ids=list(seq_ids)), timeout=5))
        if self.stubs.draft is not None:
            calls.append(self.stubs.draft.Release(
                draft_pb2.ReleaseRequest(sequence_ids=list(seq_ids)), timeout=5))
        for res in await asyncio.gather(*calls, return_exceptions=True):
            if isinstance(res, BaseException):
                log.debug("release failed: %s", res)
