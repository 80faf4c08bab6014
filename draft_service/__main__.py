"""python -m draft_service --model DIR [--port P] ... (also `specmesh serve draft`)."""

from __future__ import annotations

from draft_service.engine import DraftEngine
from draft_service.servicer import DraftServicer
from kernels import load_for_service
from specmesh.v1 import draft_pb2, draft_pb2_grpc
from specmesh.wire.metrics import ServiceMetrics
from specmesh.wire.model_service import ServicerProxy, run, run_model_service, start_engine
from specmesh.wire.service_config import ModelServiceConfig, parse_service_args

DRAFT_THREADS = 1
SERVICE_NAME = draft_pb2.DESCRIPTOR.services_by_name["DraftService"].full_name


async def build_servicer(config: ModelServiceConfig,
                        metrics: ServiceMetrics | None = None) -> DraftServicer:
    """Load the draft model (on the batcher's thread) and wrap it in a batched servicer."""
    engine, worker, prefix = await start_engine(config, metrics, load_for_service, DraftEngine,
                                                DraftEngine.propose_batch)
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
