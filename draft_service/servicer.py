"""DraftService servicer: proto <-> engine types only; engine work is batched on one thread."""

from __future__ import annotations

from draft_service.engine import DraftEngine, ProposeItem
from kernels.sampling import SamplingConfig
from specmesh.v1 import common_pb2, draft_pb2, draft_pb2_grpc
from specmesh.wire.metrics import ServiceMetrics
from specmesh.wire.batch_rpc import item_error, run_items
from specmesh.wire.codec import encode_sparse, model_info
from specmesh.wire.batcher import DynamicBatcher
from specmesh.wire.prefix_cache import PrefixCache
from specmesh.wire.tree_spec import TreeSpec, sampling_from_proto


def to_item(req: draft_pb2.ProposeRequest) -> ProposeItem:
    temperature, top_p, top_k, seed = sampling_from_proto(req.sampling)
    return ProposeItem(
        seq_id=req.header.sequence_id,
        num_cached_tokens=req.header.num_cached_tokens,
        new_tokens=list(req.header.new_tokens),
        spec=TreeSpec.from_proto(req.tree_spec),
        sampling=SamplingConfig(temperature=temperature, top_p=top_p, top_k=top_k),
        seed=seed,
    )


class DraftServicer(draft_pb2_grpc.DraftServiceServicer):
    def __init__(self, engine: DraftEngine, worker: DynamicBatcher,
                 prefix: PrefixCache | None = None, metrics: ServiceMetrics | None = None):
        self.engine = engine
        self.worker = worker
        self.metrics = metrics
        self.prefix = prefix  # prefix KV through the cache service; None = off

    async def Propose(self, request, context):
        item = to_item(request)
        if request.finished_sequence_ids:
            await self.worker.call(self.engine.release, list(request.finished_sequence_ids))
        return self._response(await self._submit(item))

    async def ProposeBatch(self, request, context):
        """Every item of a client's round; one forward per depth, outcomes item by item."""
        if request.finished_sequence_ids:
            await self.worker.call(self.engine.release, list(request.finished_sequence_ids))
        outcomes = await run_items(request.requests, to_item, self._submit)
        return draft_pb2.ProposeBatchResponse(results=[
            draft_pb2.ProposeResult(error=item_error(out)) if isinstance(out, BaseException)
            else draft_pb2.ProposeResult(response=self._response(out)) for out in outcomes])

    async def _submit(self, item: ProposeItem):
        if self.prefix is None:
            return await self.worker.submit(item)
        return await self.prefix.submit(self.worker.submit, item)

    def _response(self, result) -> draft_pb2.ProposeResponse:
        if self.metrics is not None:
            self.metrics.set_kv_blocks(self.engine.kv.num_used_blocks,
                                       self.engine.kv.num_free_blocks)
            self.metrics.set_queue_depth(self.worker.queue_depth)
        empty = common_pb2.SparseDistribution()
        return draft_pb2.ProposeResponse(
            tree=common_pb2.TokenTree(tokens=result.tokens, parents=result.parents),
            draft_dists=[encode_sparse(*d) if d is not None else empty
                         for d in result.draft_dists],
            num_cached_tokens=result.num_cached_tokens,
        )

    async def Release(self, request, context):
        n = await self.worker.call(self.engine.release, list(request.sequence_ids))
        if self.metrics is not None:
            self.metrics.set_kv_blocks(self.engine.kv.num_used_blocks,
                                       self.engine.kv.num_free_blocks)
        return draft_pb2.ReleaseResponse(num_released=n)

    async def GetModelInfo(self, request, context):
        return model_info(self.engine.loaded)

    async def close(self) -> None:
        if self.prefix is not None:
            await self.prefix.close()
        await self.worker.stop()
