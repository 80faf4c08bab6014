"""The two RPCs of one speculation round: Propose, then Verify.

`propose_batch` / `verify_batch` carry every sequence of a round in one call each (the services
run them in one batched forward) and hand back one outcome per sequence.

The verify service's reply is authoritative; a draft that is down or slow only costs speed (the
round runs with an empty tree, i.e. a plain target decode step, same output).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from specmesh.v1 import common_pb2, draft_pb2, verify_pb2
from specmesh.wire.batch_rpc import item_rpc_error
from specmesh.wire.tree_spec import TreeSpec

log = logging.getLogger(__name__)
WARN_EVERY_S = 10.0  # a draft outage logs once per this many seconds, not once per round
_last_warning = [float("-inf")]


def _warn(message: str, *args) -> None:
    now = time.monotonic()
    if now - _last_warning[0] >= WARN_EVERY_S:
        _last_warning[0] = now
        log.warning(message, *args)


class Stubs:
    """The stubs a round needs plus per-call timeouts."""

    def __init__(self, draft, verify, draft_timeout_s: float = 10.0,
                 verify_timeout_s: float = 60.0, retry_deadline_s: float = 30.0):
        self.draft = draft
        self.verify = verify
        self.draft_timeout_s = draft_timeout_s
        self.verify_timeout_s = verify_timeout_s
        self.retry_deadline_s = retry_deadline_s  # a sequence's verify outage before it fails


def header(seq_id: str, tokens: Sequence[int], num_cached: int) -> common_pb2.SequenceHeader:
    return common_pb2.SequenceHeader(sequence_id=seq_id, num_cached_tokens=num_cached,
                                     new_tokens=list(tokens[num_cached:]))


@dataclass(frozen=True)
class ProposeCall:
    """One sequence's part of a ProposeBatch."""

    seq_id: str
    tokens: Sequence[int]
    draft_cached: int
    spec: TreeSpec
    sampling: common_pb2.SamplingParams

    def request(self, cached: int) -> draft_pb2.ProposeRequest:
        return draft_pb2.ProposeRequest(header=header(self.seq_id, self.tokens, cached),
                                        tree_spec=self.spec.to_proto(), sampling=self.sampling)


async def propose_batch(stubs: Stubs, calls: Sequence[ProposeCall], finished: Sequence[str] = ()
                        ) -> list[draft_pb2.ProposeResponse | BaseException | None]:
    """Trees for every call in one ProposeBatch: a ProposeResponse, None when the draft cannot
    help (down, slow, full: the round verifies without a tree, same output) or the
    INVALID_ARGUMENT error (the caller's fault, it fails that sequence). Calls answered
    NOT_FOUND (evicted by the draft) are retried once with their full context."""
    if stubs.draft is None:
        return [None] * len(calls)
    out: list = [None] * len(calls)
    todo, cached = list(range(len(calls))), [c.draft_cached for c in calls]
    while todo:
        req = draft_pb2.ProposeBatchRequest(requests=[calls[i].request(cached[i]) for i in todo],
                                            finished_sequence_ids=list(finished))
        try:
            reply = await stubs.draft.ProposeBatch(req, timeout=stubs.draft_timeout_s)
        except grpc.aio.AioRpcError as err:
            _warn("draft %s: %s; verifying without trees", err.code().name, err.details())
            return out
        retry = []
        for i, res in zip(todo, reply.results):
            if res.HasField("response"):
                out[i] = res.response
                continue
            err = item_rpc_error(res.error)
            if err.code() == grpc.StatusCode.NOT_FOUND and cached[i] > 0:
                cached[i] = 0
                retry.append(i)
            elif err.code() == grpc.StatusCode.INVALID_ARGUMENT:
                out[i] = err
            else:
                _warn("draft %s for %s: %s; verifying without a tree",
                      err.code().name, calls[i].seq_id, err.details())
        todo, finished = retry, ()
    return out


@dataclass(frozen=True)
class VerifyCall:
    """One sequence's part of a VerifyBatch."""

    seq_id: str
    tokens: Sequence[int]
    target_cached: int
    proposal: draft_pb2.ProposeResponse | None
    sampling: common_pb2.SamplingParams

    def request(self) -> verify_pb2.VerifyRequest:
        req = verify_pb2.VerifyRequest(header=header(self.seq_id, self.tokens,
                                                     self.target_cached),
                                       sampling=self.sampling)
        if self.proposal is not None and self.proposal.tree.tokens:
            req.tree.CopyFrom(self.proposal.tree)
            req.draft_dists.extend(self.proposal.draft_dists)
        return req


async def verify_batch(stubs: Stubs, calls: Sequence[VerifyCall], finished: Sequence[str] = ()
                       ) -> list[verify_pb2.VerifyResponse | BaseException]:
    """Every call in one VerifyBatch: a reply or an AioRpcError per call (a failure of the
    whole RPC is every call's error)."""
    req = verify_pb2.VerifyBatchRequest(requests=[c.request() for c in calls],
                                        finished_sequence_ids=list(finished))
    try:
        reply = await stubs.verify.VerifyBatch(req, timeout=stubs.verify_timeout_s)
    except grpc.aio.AioRpcError as err:
        return [err] * len(calls)
    return [res.response if res.HasField("response") else item_rpc_error(res.error)
            for res in reply.results]
