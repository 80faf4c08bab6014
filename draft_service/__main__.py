"""python -m draft_service --model DIR [--port P] ... (also `specmesh serve draft`)."""

from __future__ import annotations

import torch

from draft_service.engine import DraftEngine
from draft_service.servicer import DraftServicer
from kernels import load_model
from specmesh.v1 import draft_pb2, draft_pb2_grpc
from specmesh.wire.metrics import ServiceMetrics
from specmesh.wire.model_service import ServicerProxy, make_batcher, run, run_model_service
from specmesh.wire.prefix_cache import make_prefix_cache
from specmesh.wire.service_config import ModelServiceConfig, parse_service_args

DRAFT_THREADS = 1
SERVICE_NAME = draft_pb2.DESCRIPTOR.services_by_name["DraftService"].full_name


async def build_servicer(config: ModelServiceConfig,
                        metrics: ServiceMetrics | None = None) -> DraftServicer:
    """Load the draft model (on the batcher's thread) and wrap it in a batched servicer."""
    engine: DraftEngine | None = None
    worker = make_batcher(lambda items: engine.propose_batch(items), config, metrics)
    # the batcher's one thread loads the model too: every torch op of this process runs on it
    # (a second thread's OpenMP team would put libgomp in throttled-spin mode: ~1.5x slower)
    if config.threads is not None:
        await worker.call(torch.set_num_threads, config.threads)
    loaded = await worker.call(load_model, config.model, getattr(torch, config.dtype),
                               config.device)
    loaded.model.set_batch_invariant(config.batch_invariant)
    engine = await worker.call(DraftEngine, loaded, config.kv_cache_mb, config.block_size,
                               config.idle_evict_s)  # allocates the KV cache: torch work too
    prefix = make_prefix_cache(config.cache_addr, loaded.fingerprint, config.prefix_chunk_size,
                               lambda *args: worker.call(engine.export_prefix, *args), metrics)
    return DraftServicer(engine, worker, prefix, metrics)


async def serve(config: ModelServiceConfig) -> None:
    await run_model_service(config, SERVICE_NAME, draft_pb2_grpc.add_DraftServiceServicer_to_server,
                            lambda metrics: build_servicer(config, metrics), ServicerProxy())


def main(argv: list[str] | None = None) -> None:
    # one thread by default: a draft model is small, and a second OpenMP thread's spinning
    # took a core from the verify service beside it (chain:4 1.5x faster with one; README)
    run(serve(parse_service_args("specmesh serve draft", 256.0, argv, threads=DRAFT_THREADS)))


if __name__ == "__main__":
    main()
