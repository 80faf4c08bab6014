"""The two RPCs of one speculation round: Propose, then Verify.

`propose_batch` / `verify_batch` carry every sequence of a round in one call each (the services
run them in one batched forward) and hand back one outcome per sequence. Requests are built
from the plan's deltas alone (`propose_request`, `verify_request`).

The verify service's reply is authoritative; a draft that is down or slow only costs speed (the
round runs with an empty tree, i.e. a plain target decode step, same output).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import grpc

from specmesh.clients.plan import SequenceDelta
from specmesh.clients.round_stream import RoundStream, batch_method
from specmesh.v1 import common_pb2, draft_pb2, verify_pb2
from specmesh.wire.batch_rpc import item_rpc_error

log = logging.getLogger(__name__)
WARN_EVERY_S = 10.0  # a draft outage logs once per this many seconds, not once per round
_last_warning = [float("-inf")]


def _warn(message: str, *args) -> None:
    now = time.monotonic()
    if now - _last_warning[0] >= WARN_EVERY_S:
        _last_warning[0] = now
        log.warning(message, *args)


class Stubs:
    """The stubs a round needs plus per-call timeouts; `close()` ends the round streams."""

    def __init__(self, draft, verify, draft_timeout_s: float = 10.0,
                 verify_timeout_s: float = 60.0, retry_deadline_s: float = 30.0):
        self.draft = draft
        self.verify = verify
        # the round's two calls, each over one open stream where the stub has one
        self.propose_call = batch_method(draft, "ProposeBatch") if draft is not None else None
        self.verify_call = batch_method(verify, "VerifyBatch")
        self.draft_timeout_s = draft_timeout_s
        self.verify_timeout_s = verify_timeout_s
        self.retry_deadline_s = retry_deadline_s  # a sequence's verify outage before it fails

    def close(self) -> None:
        for call in (self.propose_call, self.verify_call):
            if isinstance(call, RoundStream):
                call.close()


def propose_request(d: SequenceDelta) -> draft_pb2.ProposeRequest:
    """The draft's part of one planned sequence, exactly as the plan describes it."""
    return draft_pb2.ProposeRequest(
        header=common_pb2.SequenceHeader(sequence_id=d.seq_id,
                                         num_cached_tokens=d.draft_num_cached,
                                         new_tokens=d.draft_new_tokens),
        tree_spec=d.spec.to_proto(), sampling=d.sampling)


def verify_request(d: SequenceDelta, proposal: draft_pb2.ProposeResponse | None
                   ) -> verify_pb2.VerifyRequest:
    """The verifier's part of one planned sequence, with the draft's tree when there is one."""
    req = verify_pb2.VerifyRequest(
        header=common_pb2.SequenceHeader(sequence_id=d.seq_id,
                                         num_cached_tokens=d.target_num_cached,
                                         new_tokens=d.target_new_tokens),
        sampling=d.sampling)
    if proposal is not None and proposal.tree.tokens:
        req.tree.CopyFrom(proposal.tree)
        req.draft_dists.extend(proposal.draft_dists)
    return req


async def propose_batch(stubs: Stubs, steps: Sequence[SequenceDelta],
                        finished: Sequence[str] = ()
                        ) -> list[draft_pb2.ProposeResponse | BaseException | None]:
    """Trees for every step in one ProposeBatch (which also frees `finished`): a
    ProposeResponse, None when the draft cannot help (down, slow, full: the round verifies
    without a tree, same output), or the item's error: INVALID_ARGUMENT fails that sequence,
    NOT_FOUND (evicted by the draft) makes the next round resend its full context."""
    if stubs.draft is None or not (steps or finished):
        return [None] * len(steps)
    req = draft_pb2.ProposeBatchRequest(requests=[propose_request(d) for d in steps],
                                        finished_sequence_ids=list(finished))
    try:
        reply = await stubs.propose_call(req, timeout=stubs.draft_timeout_s)
    except grpc.aio.AioRpcError as err:
        _warn("draft %s: %s; verifying without trees", err.code().name, err.details())
        return [None] * len(steps)
    out: list = []
    for d, res in zip(steps, reply.results):
        if res.HasField("response"):
            out.append(res.response)
            continue
        err = item_rpc_error(res.error)
        if err.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
            out.append(err)
        else:
            _warn("draft %s for %s: %s; verifying without a tree",
                  err.code().name, d.seq_id, err.details())
            out.append(None)
    return out


async def verify_batch(stubs: Stubs, requests: Sequence[verify_pb2.VerifyRequest],
                       finished: Sequence[str] = ()
                       ) -> list[verify_pb2.VerifyResponse | BaseException]:
    """Every request in one VerifyBatch (which also frees `finished`): a reply or an
    AioRpcError per request (a failure of the whole RPC is every request's error)."""
    if not (requests or finished):
        return []
    req = verify_pb2.VerifyBatchRequest(requests=list(requests),
                                        finished_sequence_ids=list(finished))
    try:
        reply = await stubs.verify_call(req, timeout=stubs.verify_timeout_s)
    except grpc.aio.AioRpcError as err:
        return [err] * len(requests)
    return [res.response if res.HasField("response") else item_rpc_error(res.error)
            for res in reply.results]
