"""DraftService servicer: proto <-> engine types only (the shared part is ModelServicer)."""

from __future__ import annotations

from specmesh.draft_service.engine import ProposeItem, ProposeResult
from specmesh.model_service.servicer import ModelServicer, sampling_config
from specmesh.v1 import common_pb2, draft_pb2, draft_pb2_grpc
from specmesh.wire.batch_rpc import item_error
from specmesh.wire.codec import encode_sparse
from specmesh.wire.tree_spec import TreeSpec


def to_item(req: draft_pb2.ProposeRequest) -> ProposeItem:
    sampling, seed = sampling_config(req.sampling)
    return ProposeItem(
        seq_id=req.header.sequence_id,
        num_cached_tokens=req.header.num_cached_tokens,
        new_tokens=list(req.header.new_tokens),
        spec=TreeSpec.from_proto(req.tree_spec),
        sampling=sampling,
        seed=seed,
    )


class DraftServicer(ModelServicer, draft_pb2_grpc.DraftServiceServicer):
    release_reply = draft_pb2.ReleaseResponse

    async def Propose(self, request, context):
        _, result = await self.run_one(request, context, to_item)
        return self._response(result)

    async def ProposeBatch(self, request, context):
        """Every item of a client's round; one forward per depth, outcomes item by item."""
        outcomes = await self.run_batch(request, context, to_item)
        return draft_pb2.ProposeBatchResponse(results=[
            draft_pb2.ProposeResult(error=item_error(out)) if isinstance(out, BaseException)
            else draft_pb2.ProposeResult(response=self._response(out)) for out in outcomes])

    def _response(self, result: ProposeResult) -> draft_pb2.ProposeResponse:
        self.observe_state()
        empty = common_pb2.SparseDistribution()
        return draft_pb2.ProposeResponse(
            tree=common_pb2.TokenTree(tokens=result.tokens, parents=result.parents),
            draft_dists=[encode_sparse(*d) if d is not None else empty
                         for d in result.draft_dists],
            num_cached_tokens=result.num_cached_tokens,
        )
