"""DraftService servicer: proto <-> engine types only (the shared part is ModelServicer)."""

from __future__ import annotations

from specmesh.draft_service.engine import ProposeItem, ProposeResult
from specmesh.draft_service.ngram_engine import NgramDrafter
from specmesh.model_service.servicer import ModelServicer, sampling_config, scope
from specmesh.v1 import common_pb2, draft_pb2, draft_pb2_grpc
from specmesh.wire.batch_rpc import item_error
from specmesh.wire.codec import encode_sparse
from specmesh.wire.tree_spec import TreeSpec


def to_item(req: draft_pb2.ProposeRequest, seq_id: str) -> ProposeItem:
    """`seq_id`: the id the service keeps the sequence under (scoped to its caller)."""
    sampling, seed = sampling_config(req.sampling)
    return ProposeItem(
        seq_id=seq_id,
        num_cached_tokens=req.header.num_cached_tokens,
        new_tokens=list(req.header.new_tokens),
        spec=TreeSpec.from_proto(req.tree_spec),
        sampling=sampling,
        seed=seed,
    )


NGRAM_INFO = common_pb2.ModelInfo(name="ngram", vocab_size=0, max_context=2**31 - 1,
                                  fingerprint="ngram-v1", bos_token_id=-1, eos_token_id=-1)


class DraftServicer(ModelServicer, draft_pb2_grpc.DraftServiceServicer):
    """Model drafting through the engine, n-gram drafting (tree kind `ngram`) inline. Without
    a model (`--method ngram`: engine None) every request is drafted by n-gram lookup with its
    tree's node budget and depth, so any client (default tree included) works unchanged."""

    release_reply = draft_pb2.ReleaseResponse

    def __init__(self, engine, worker, prefix=None, metrics=None,
                 ngram: NgramDrafter | None = None):
        super().__init__(engine, worker, prefix, metrics)
        self.ngram = ngram or NgramDrafter()

    def submit(self, item: ProposeItem, caller=None):
        if item.spec.model_free or self.engine is None:
            return self._ngram_propose(item)
        return super().submit(item, caller)

    async def _ngram_propose(self, item: ProposeItem):
        await self.ngram.prepare(item)
        return self.ngram.propose(item)

    async def release_finished(self, seq_ids, owner: str) -> int:
        n = self.ngram.release([scope(owner, s) for s in seq_ids])
        if self.engine is not None:
            n += await super().release_finished(seq_ids, owner)
        return n

    async def close(self) -> None:
        await self.ngram.close()
        await super().close()

    async def GetModelInfo(self, request, context):
        return NGRAM_INFO if self.engine is None else await super().GetModelInfo(request, context)

    async def Propose(self, request, context):
        _, result = await self.run_one(request, context, to_item)
        self.observe_state()
        return self._response(result)

    async def ProposeBatch(self, request, context):
        """Every item of a client's round; one forward per depth, outcomes item by item."""
        outcomes = await self.run_batch(request, context, to_item)
        reply = draft_pb2.ProposeBatchResponse(results=[
            draft_pb2.ProposeResult(error=item_error(out)) if isinstance(out, BaseException)
            else draft_pb2.ProposeResult(response=self._response(out)) for out in outcomes])
        self.observe_state()
        return reply

    async def ProposeStream(self, request_iterator, context):
        """ProposeBatch for each request of one long-lived stream, answered in order."""
        async for request in request_iterator:
            yield await self.ProposeBatch(request, context)

    def _response(self, result: ProposeResult) -> draft_pb2.ProposeResponse:
        empty = common_pb2.SparseDistribution()
        return draft_pb2.ProposeResponse(
            tree=common_pb2.TokenTree(tokens=result.tokens, parents=result.parents),
            draft_dists=[encode_sparse(*d) if d is not None else empty
                         for d in result.draft_dists],
            num_cached_tokens=result.num_cached_tokens,
        )
