"""In-process draft + verify servers on port 0 for end-to-end tests (real gRPC, real models)."""

from __future__ import annotations

import contextlib
import pathlib

from draft_service.__main__ import SERVICE_NAME as DRAFT_NAME
from draft_service.__main__ import build_servicer as build_draft
from specmesh.v1 import draft_pb2_grpc, verify_pb2_grpc
from specmesh.wire.server import build_server
from specmesh.wire.service_config import ModelServiceConfig
from verify_service.__main__ import SERVICE_NAME as VERIFY_NAME
from verify_service.__main__ import build_servicer as build_verify


@contextlib.asynccontextmanager
async def model_server(kind: str, model: pathlib.Path, **config):
    """Yield (address, servicer) of a started, SERVING draft or verify server."""
    cfg = ModelServiceConfig(model=str(model), **config)
    if kind == "draft":
        servicer = await build_draft(cfg)
        add, name = draft_pb2_grpc.add_DraftServiceServicer_to_server, DRAFT_NAME
    else:
        servicer = await build_verify(cfg)
        add, name = verify_pb2_grpc.add_VerifyServiceServicer_to_server, VERIFY_NAME
    server = await build_server([(add, servicer)], [name], port=0,
                                max_message_bytes=int(cfg.max_message_mb * (1 << 20)))
    await server.start()
    await server.set_serving(True)
    try:
        yield f"127.0.0.1:{server.port}", servicer
    finally:
        await server.stop(0.5)
        await servicer.close()


@contextlib.asynccontextmanager
async def spec_stack(target: pathlib.Path, draft: pathlib.Path, **config):
    """Yield (verify_addr, draft_addr)."""
    async with model_server("verify", target, **config) as (v, _), \
            model_server("draft", draft, **config) as (d, _):
        yield v, d
