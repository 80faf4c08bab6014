"""VerifyService servicer: proto <-> engine types only; engine work is batched on one thread."""

from __future__ import annotations

from kernels.sampling import SamplingConfig
from specmesh.v1 import common_pb2, verify_pb2, verify_pb2_grpc
from specmesh.wire.batch_rpc import item_error, run_items
from specmesh.wire.codec import decode_sparse, model_info
from specmesh.wire.batcher import DynamicBatcher
from specmesh.wire.prefix_cache import PrefixCache
from specmesh.wire.errors import InvalidRequest
from specmesh.wire.metrics import ServiceMetrics
from specmesh.wire.tree_spec import sampling_from_proto
from verify_service.engine import VerifyEngine, VerifyItem


def sampling_config(msg: common_pb2.SamplingParams) -> tuple[SamplingConfig, int | None]:
    temperature, top_p, top_k, seed = sampling_from_proto(msg)
    return SamplingConfig(temperature=temperature, top_p=top_p, top_k=top_k), seed


def to_item(req: verify_pb2.VerifyRequest) -> VerifyItem:
    """Decode and check the fields a proto can get wrong; the engine checks the rest."""
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
        seq_id=req.header.sequence_id,
        num_cached_tokens=req.header.num_cached_tokens,
        new_tokens=list(req.header.new_tokens),
        tree_tokens=list(req.tree.tokens),
        tree_parents=list(req.tree.parents),
        draft_dists=dists,
        sampling=sampling,
        seed=seed,
        return_logprobs=req.return_logprobs,
    )


class VerifyServicer(verify_pb2_grpc.VerifyServiceServicer):
    def __init__(self, engine: VerifyEngine, worker: DynamicBatcher,
                 prefix: PrefixCache | None = None, metrics: ServiceMetrics | None = None):
        self.engine = engine
        self.worker = worker
        self.metrics = metrics
        self.prefix = prefix  # prefix KV through the cache service; None = off

    async def Verify(self, request, context):
        item = to_item(request)
        if request.finished_sequence_ids:
            await self.worker.call(self.engine.release, list(request.finished_sequence_ids))
        return self._response(await self._submit(item), len(item.tree_tokens))

    async def VerifyBatch(self, request, context):
        """Every item of a client's round; one batched forward, outcomes item by item."""
        if request.finished_sequence_ids:
            await self.worker.call(self.engine.release, list(request.finished_sequence_ids))
        outcomes = await run_items(request.requests, to_item, self._submit)
        results = []
        for req, out in zip(request.requests, outcomes):
            if isinstance(out, BaseException):
                results.append(verify_pb2.VerifyResult(error=item_error(out)))
            else:
                results.append(verify_pb2.VerifyResult(
                    response=self._response(out, len(req.tree.tokens))))
        return verify_pb2.VerifyBatchResponse(results=results)

    async def _submit(self, item: VerifyItem):
        if self.prefix is None:
            return await self.worker.submit(item)
        return await self.prefix.submit(self.worker.submit, item)

    def _response(self, result, num_tree: int) -> verify_pb2.VerifyResponse:
        if self.metrics is not None:
            self.metrics.observe_round(num_tree, result.num_accepted_draft_tokens)
            self.metrics.set_kv_blocks(self.engine.kv.num_used_blocks,
                                       self.engine.kv.num_free_blocks)
            self.metrics.set_queue_depth(self.worker.queue_depth)
        return verify_pb2.VerifyResponse(
            tokens=result.tokens,
            num_accepted_draft_tokens=result.num_accepted_draft_tokens,
            logprobs=result.logprobs,
            num_cached_tokens=result.num_cached_tokens,
        )

    async def Release(self, request, context):
        n = await self.worker.call(self.engine.release, list(request.sequence_ids))
        if self.metrics is not None:
            self.metrics.set_kv_blocks(self.engine.kv.num_used_blocks,
                                       self.engine.kv.num_free_blocks)
        return verify_pb2.VerifyReleaseResponse(num_released=n)

    async def GetModelInfo(self, request, context):
        return model_info(self.engine.loaded)

    async def close(self) -> None:
        if self.prefix is not None:
            await self.prefix.close()
        await self.worker.stop()

