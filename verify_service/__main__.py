"""python -m verify_service --model DIR [--port P] ... (also `specmesh serve verify`)."""

from __future__ import annotations

from kernels import load_for_service
from specmesh.v1 import verify_pb2, verify_pb2_grpc
from specmesh.wire.metrics import ServiceMetrics
from specmesh.wire.model_service import ServicerProxy, run, run_model_service, start_engine
from specmesh.wire.service_config import ModelServiceConfig, parse_service_args
from verify_service.engine import VerifyEngine
from verify_service.servicer import VerifyServicer

SERVICE_NAME = verify_pb2.DESCRIPTOR.services_by_name["VerifyService"].full_name


async def build_servicer(config: ModelServiceConfig,
                        metrics: ServiceMetrics | None = None) -> VerifyServicer:
    """Load the target model (on the batcher's thread) and wrap it in a batched servicer."""
    engine, worker, prefix = await start_engine(config, metrics, load_for_service, VerifyEngine,
                                                VerifyEngine.verify_batch)
    return VerifyServicer(engine, worker, prefix, metrics)


async def serve(config: ModelServiceConfig) -> None:
    await run_model_service(config, SERVICE_NAME, verify_pb2_grpc.add_VerifyServiceServicer_to_server,
                            lambda metrics: build_servicer(config, metrics), ServicerProxy())


def main(argv: list[str] | None = None) -> None:
    run(serve(parse_service_args("specmesh serve verify", 1024.0, argv)))


if __name__ == "__main__":
    main()
