"""VerifyService servicer: proto <-> engine types only (the shared part is ModelServicer)."""

from __future__ import annotations

from specmesh.model_service.servicer import ModelServicer, sampling_config
from specmesh.v1 import verify_pb2, verify_pb2_grpc
from specmesh.verify_service.engine import VerifyItem, VerifyResult
from specmesh.wire.batch_rpc import item_error
from specmesh.wire.codec import decode_sparse
from specmesh.wire.errors import InvalidRequest


def to_item(req: verify_pb2.VerifyRequest, seq_id: str) -> VerifyItem:
    """Decode and check the fields a proto can get wrong; the engine checks the rest.
    `seq_id`: the id the service keeps the sequence under (scoped to its caller)."""
    sampling, seed = sampling_config(req.sampling)
    if len(req.tree.tokens) != len(req.tree.parents):
        raise InvalidRequest("tree.parents", f"{len(req.tree.parents)} parents for "
                             f"{len(req.tree.tokens)} tokens")
    dists = []
    for i, d in enumerate(req.draft_dists):
        try:
            sparse = decode_sparse(d)
        except ValueError as exc:
            raise InvalidRequest(f"draft_dists[{i}].probs_f16", str(exc)) from exc
        dists.append((sparse.token_ids, sparse.probs) if len(sparse.token_ids) else None)
    return VerifyItem(
        seq_id=seq_id,
        num_cached_tokens=req.header.num_cached_tokens,
        new_tokens=list(req.header.new_tokens),
        tree_tokens=list(req.tree.tokens),
        tree_parents=list(req.tree.parents),
        draft_dists=dists,
        sampling=sampling,
        seed=seed,
        return_logprobs=req.return_logprobs,
    )


class VerifyServicer(ModelServicer, verify_pb2_grpc.VerifyServiceServicer):
    release_reply = verify_pb2.VerifyReleaseResponse

    async def Verify(self, request, context):
        item, result = await self.run_one(request, context, to_item)
        self.observe_state()
        return self._response(result, len(item.tree_tokens))

    async def VerifyBatch(self, request, context):
        """Every item of a client's round; one batched forward, outcomes item by item."""
        outcomes = await self.run_batch(request, context, to_item)
        reply = verify_pb2.VerifyBatchResponse(results=[
            verify_pb2.VerifyResult(error=item_error(out)) if isinstance(out, BaseException)
            else verify_pb2.VerifyResult(response=self._response(out, len(req.tree.tokens)))
            for req, out in zip(request.requests, outcomes)])
        self.observe_state()
        return reply

    async def VerifyStream(self, request_iterator, context):
        """VerifyBatch for each request of one long-lived stream, answered in order."""
        async for request in request_iterator:
            yield await self.VerifyBatch(request, context)

    def _response(self, result: VerifyResult, num_tree: int) -> verify_pb2.VerifyResponse:
        if self.metrics is not None and num_tree:  # a speculation round (not a plain step)
            self.metrics.observe_round(num_tree, result.num_accepted_draft_tokens)
        return verify_pb2.VerifyResponse(
            tokens=result.tokens,
            num_accepted_draft_tokens=result.num_accepted_draft_tokens,
            logprobs=result.logprobs,
            num_cached_tokens=result.num_cached_tokens,
        )
