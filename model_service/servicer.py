"""What the draft and verify servicers share: batched submission (through the prefix cache when
there is one), releases, model info, metrics of the KV cache and queue, and shutdown.

A service's servicer adds only its proto <-> engine conversions:

    class DraftServicer(ModelServicer, draft_pb2_grpc.DraftServiceServicer):
        release_reply = draft_pb2.ReleaseResponse
        async def Propose(self, request, context):
            item, result = await self.run_one(request, context, to_item)
            return self._response(result)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from specmesh.errors import OWNER_SEP, InvalidRequest
from specmesh.kernels.sampling import InvalidSampling, SamplingConfig
from specmesh.model_service.batcher import DynamicBatcher
from specmesh.model_service.engine import SequenceEngine
from specmesh.model_service.prefix_cache import PrefixCache
from specmesh.v1 import common_pb2
from specmesh.wire.batch_rpc import run_items
from specmesh.wire.codec import model_info
from specmesh.wire.metrics import ServiceMetrics
from specmesh.wire.security import caller_identity


def sampling_config(msg: common_pb2.SamplingParams) -> tuple[SamplingConfig, int | None]:
    """The request's sampling fields as the engine's SamplingConfig (checked here, once:
    InvalidRequest names the field) and the seed."""
    config = SamplingConfig(temperature=msg.temperature,
                            top_p=msg.top_p if msg.HasField("top_p") else 1.0, top_k=msg.top_k)
    try:
        config.validate()
    except InvalidSampling as exc:
        raise InvalidRequest(exc.field, exc.problem) from exc
    return config, (msg.seed if msg.HasField("seed") else None)


def scope(owner: str, seq_id: str) -> str:
    """The id a service keeps a sequence under: bound to the identity that created it, so
    another caller naming the same id (Release, finished ids, a Verify that would recreate it)
    reaches a different sequence, never this one."""
    return f"{owner}{OWNER_SEP}{seq_id}"


class ModelServicer:
    """Engine work goes through `worker` (one thread, batched); proto handling stays here."""

    release_reply: Callable[..., Any]  # the service's Release response message class

    def __init__(self, engine: SequenceEngine, worker: DynamicBatcher,
                 prefix: PrefixCache | None = None, metrics: ServiceMetrics | None = None):
        self.engine = engine
        self.worker = worker
        self.metrics = metrics
        self.prefix = prefix  # prefix KV through the cache service; None = off

    async def run_one(self, request, context, to_item: Callable[[Any, str], Any]
                      ) -> tuple[Any, Any]:
        """A single-item RPC: decode, free the finished sequences it names, run; (item, result).
        `to_item(request, seq_id)` decodes a request under the caller-scoped id."""
        owner = caller_identity(context)
        item = to_item(request, scope(owner, request.header.sequence_id))
        await self.release_finished(request.finished_sequence_ids, owner)
        return item, await self.submit(item)

    async def run_batch(self, request, context, to_item: Callable[[Any, str], Any]
                        ) -> list[Any]:
        """A batched RPC: one outcome (result or exception) per item, in order."""
        owner = caller_identity(context)
        await self.release_finished(request.finished_sequence_ids, owner)
        caller = object()  # its items are one caller to the batcher: no waiting for company
        return await run_items(
            request.requests, lambda req: to_item(req, scope(owner, req.header.sequence_id)),
            lambda item: self.submit(item, caller))

    def submit(self, item, caller=None) -> Awaitable:
        """`item`'s result, to await: the batcher's future itself without a prefix cache (no
        task per item of a batch), else the prefix look-up then the batcher."""
        if self.prefix is None:
            return self.worker.enqueue(item, caller)
        return self.prefix.submit(lambda it: self.worker.submit(it, caller), item)

    async def release_finished(self, seq_ids: Sequence[str], owner: str) -> int:
        """Free the caller's own sequences among `seq_ids` (another caller's ids name nothing)."""
        if not seq_ids:
            return 0
        n = await self.worker.call(self.engine.release, [scope(owner, s) for s in seq_ids])
        self.observe_state()
        return n

    def observe_state(self) -> None:
        """KV blocks in use and queue depth, after each change."""
        if self.metrics is not None and self.engine is not None:
            self.metrics.set_kv_blocks(self.engine.kv.num_used_blocks,
                                       self.engine.kv.num_free_blocks)
            self.metrics.set_queue_depth(self.worker.queue_depth)

    async def Release(self, request, context):
        return self.release_reply(num_released=await self.release_finished(
            request.sequence_ids, caller_identity(context)))

    async def GetModelInfo(self, request, context):
        return model_info(self.engine.loaded)

    async def close(self) -> None:
        if self.prefix is not None:
            await self.prefix.close()
        if self.worker is not None:
            await self.worker.stop()
