"""In-process draft + verify servers on port 0 for end-to-end tests (real gRPC, real models)."""

from __future__ import annotations

import contextlib
import pathlib

from specmesh.draft_service.__main__ import SPEC as DRAFT
from specmesh.model_service.config import ModelServiceConfig
from specmesh.model_service.startup import build_servicer
from specmesh.verify_service.__main__ import SPEC as VERIFY
from specmesh.wire.server import build_server


@contextlib.asynccontextmanager
async def model_server(kind: str, model: pathlib.Path | None, **config):
    """Yield (address, servicer) of a started, SERVING draft or verify server (a model-free
    draft server: model None, method="ngram")."""
    cfg = ModelServiceConfig.from_flat(model=str(model) if model else None, **config)
    spec = DRAFT if kind == "draft" else VERIFY
    servicer = await build_servicer(spec, cfg)
    server = await build_server([(spec.add_to_server, servicer)], [spec.full_name], port=0,
                                max_message_bytes=int(cfg.max_message_mb * (1 << 20)),
                                security=cfg.security)
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
