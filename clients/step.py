"""The two RPCs of one speculation round for one sequence: Propose, then Verify.

The verify service's reply is authoritative; a draft that is down or slow only costs speed (the
round runs with an empty tree, i.e. a plain target decode step, same output).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import grpc

from specmesh.v1 import common_pb2, draft_pb2, verify_pb2
from specmesh.wire.tree_spec import TreeSpec

log = logging.getLogger(__name__)


class Stubs:
    """The stubs a round needs plus per-call timeouts."""

    def __init__(self, draft, verify, draft_timeout_s: float = 10.0,
                 verify_timeout_s: float = 60.0):
        self.draft = draft
        self.verify = verify
        self.draft_timeout_s = draft_timeout_s
        self.verify_timeout_s = verify_timeout_s


def header(seq_id: str, tokens: Sequence[int], num_cached: int) -> common_pb2.SequenceHeader:
    return common_pb2.SequenceHeader(sequence_id=seq_id, num_cached_tokens=num_cached,
                                     new_tokens=list(tokens[num_cached:]))


async def propose(stubs: Stubs, seq_id: str, tokens: Sequence[int], draft_cached: int,
                  spec: TreeSpec, sampling: common_pb2.SamplingParams,
                  finished: Sequence[str] = ()) -> draft_pb2.ProposeResponse | None:
    """Ask the draft for a tree; None when the draft cannot help this round.

    A NOT_FOUND (the draft evicted the sequence) is retried at once with the full context.
    INVALID_ARGUMENT is the caller's fault and propagates; anything else degrades to no tree.
    """
    if stubs.draft is None or not spec.enabled:
        return None
    for cached in (draft_cached, 0):
        req = draft_pb2.ProposeRequest(header=header(seq_id, tokens, cached),
                                       tree_spec=spec.to_proto(), sampling=sampling,
                                       finished_sequence_ids=list(finished))
        try:
            return await stubs.draft.Propose(req, timeout=stubs.draft_timeout_s)
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND and cached > 0:
                finished = ()
                continue
            if err.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise
            log.warning("draft %s: %s; verifying without a tree", err.code().name, err.details())
            return None
    return None


async def verify(stubs: Stubs, seq_id: str, tokens: Sequence[int], target_cached: int,
                 proposal: draft_pb2.ProposeResponse | None,
                 sampling: common_pb2.SamplingParams,
                 finished: Sequence[str] = ()) -> verify_pb2.VerifyResponse:
    """One Verify call; errors propagate (the loop decides: resend, requeue or fail)."""
    req = verify_pb2.VerifyRequest(header=header(seq_id, tokens, target_cached),
                                   sampling=sampling, finished_sequence_ids=list(finished))
    if proposal is not None and proposal.tree.tokens:
        req.tree.CopyFrom(proposal.tree)
        req.draft_dists.extend(proposal.draft_dists)
    return await stubs.verify.Verify(req, timeout=stubs.verify_timeout_s)
