"""One speculation round for one sequence: propose -> verify -> commit.

The verify service's reply is authoritative; a draft that is down or slow only costs speed
(the round runs with an empty tree, i.e. a plain target decode step, same output).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import grpc

from clients.sequence import SequenceState
from specmesh.v1 import common_pb2, draft_pb2, verify_pb2
from specmesh.wire.tree_spec import TreeSpec

log = logging.getLogger(__name__)

RETRY_CODES = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)


@dataclass(frozen=True)
class RoundOutput:
    tokens: list[int]  # accepted draft tokens + one recovered/bonus token
    num_drafted: int
    num_accepted: int
    draft_s: float
    verify_s: float


class Stubs:
    """The two stubs a round needs plus timeouts."""

    def __init__(self, draft, verify, draft_timeout_s: float = 10.0,
                 verify_timeout_s: float = 60.0):
        self.draft = draft
        self.verify = verify
        self.draft_timeout_s = draft_timeout_s
        self.verify_timeout_s = verify_timeout_s


async def propose(stubs: Stubs, seq: SequenceState, spec: TreeSpec,
                  sampling: common_pb2.SamplingParams,
                  finished: list[str]) -> draft_pb2.ProposeResponse | None:
    """Ask the draft for a tree; None when the draft cannot help this round."""
    if stubs.draft is None or not spec.enabled:
        return None
    for _ in range(2):
        req = draft_pb2.ProposeRequest(header=seq.draft_header(), tree_spec=spec.to_proto(),
                                       sampling=sampling, finished_sequence_ids=finished)
        try:
            reply = await stubs.draft.Propose(req, timeout=stubs.draft_timeout_s)
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND and seq.draft_cached > 0:
                seq.draft_cached = 0  # evicted: resend the full context
                continue
            if err.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise
            log.warning("draft %s: %s; verifying without a tree", err.code().name, err.details())
            return None
        seq.draft_cached = reply.num_cached_tokens
        return reply
    return None


async def verify(stubs: Stubs, seq: SequenceState, proposal: draft_pb2.ProposeResponse | None,
                 sampling: common_pb2.SamplingParams,
                 finished: list[str]) -> verify_pb2.VerifyResponse:
    """Verify (retrying on NOT_FOUND with full context and on RESOURCE_EXHAUSTED with backoff)."""
    backoff = 0.01
    while True:
        req = verify_pb2.VerifyRequest(header=seq.target_header(), sampling=sampling,
                                       finished_sequence_ids=finished)
        if proposal is not None and proposal.tree.tokens:
            req.tree.CopyFrom(proposal.tree)
            req.draft_dists.extend(proposal.draft_dists)
        try:
            return await stubs.verify.Verify(req, timeout=stubs.verify_timeout_s)
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND and seq.target_cached > 0:
                seq.target_cached = 0
            elif err.code() in RETRY_CODES:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
            else:
                raise
        finished = []


async def run_round(stubs: Stubs, seq: SequenceState, spec: TreeSpec,
                    sampling: common_pb2.SamplingParams,
                    finished: list[str] = ()) -> RoundOutput:
    """propose -> verify -> commit the returned tokens into `seq`."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    proposal = await propose(stubs, seq, spec, sampling, list(finished))
    t1 = loop.time()
    reply = await verify(stubs, seq, proposal, sampling, list(finished))
    t2 = loop.time()
    seq.tokens.extend(reply.tokens)
    seq.target_cached = reply.num_cached_tokens
    drafted = len(proposal.tree.tokens) if proposal is not None else 0
    return RoundOutput(list(reply.tokens), drafted, reply.num_accepted_draft_tokens,
                       t1 - t0, t2 - t1)
