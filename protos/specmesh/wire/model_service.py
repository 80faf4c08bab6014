"""Start-up shared by the draft and verify services: serve health first, load, then SERVING."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from specmesh.wire.batcher import DynamicBatcher
from specmesh.wire.metrics import MetricsInterceptor, ServiceMetrics, start_metrics_server
from specmesh.wire.prefix_cache import make_prefix_cache
from specmesh.wire.server import Server, build_server, serve_until_signal
from specmesh.wire.service_config import ModelServiceConfig

log = logging.getLogger(__name__)


async def run_model_service(
    config: ModelServiceConfig,
    service_name: str,
    add_to_server: Callable,
    make_servicer: Callable[[ServiceMetrics], Awaitable[object]],
    servicer_holder: "ServicerProxy",
    on_started: Callable[[Server], None] | None = None,
) -> None:
    """Bind (health NOT_SERVING), build the servicer (loads the model), report SERVING, run
    until SIGINT/SIGTERM, stop gracefully. Metrics on `config.metrics_port` when set."""
    metrics = ServiceMetrics(service_name.rsplit(".", 1)[-1])
    if config.metrics_port is not None:
        port = start_metrics_server(config.metrics_port, metrics)
        print(f"metrics on :{port}/metrics", flush=True)
    server = await build_server([(add_to_server, servicer_holder)], [service_name],
                                port=config.port, host=config.host,
                                interceptors=[MetricsInterceptor(metrics)],
                                max_message_bytes=int(config.max_message_mb * (1 << 20)))
    await server.start()
    print(f"{service_name} listening on {config.host}:{server.port}", flush=True)
    servicer_holder.target = await make_servicer(metrics)
    await server.set_serving(True)
    if on_started:
        on_started(server)
    await serve_until_signal(server, ready_line=f"SERVING {config.host}:{server.port}")
    closer = getattr(servicer_holder.target, "close", None)
    if closer is not None:
        await closer()


async def start_engine(config: ModelServiceConfig, metrics: ServiceMetrics | None,
                       load: Callable, make_engine: Callable, run_batch: Callable):
    """(engine, batcher, prefix cache) of a model service. The model is loaded and the engine
    (its KV cache) built on the batcher's one thread, where every forward runs: all torch work of
    the process on one thread (a second thread's OpenMP team put libgomp in throttled-spin mode,
    ~1.5x slower). `load(model, dtype, device, threads, batch_invariant)` returns the loaded
    model; `make_engine(loaded, kv_cache_mb, block_size, idle_evict_s)`; `run_batch(engine,
    items)` runs one batch."""
    engine = None
    worker = make_batcher(lambda items: run_batch(engine, items), config, metrics)
    loaded = await worker.call(load, config.model, config.dtype, config.device, config.threads,
                               config.batch_invariant)
    engine = await worker.call(make_engine, loaded, config.kv_cache_mb, config.block_size,
                               config.idle_evict_s)
    prefix = make_prefix_cache(config.cache_addr, loaded.fingerprint, config.prefix_chunk_size,
                               lambda *args: worker.call(engine.export_prefix, *args), metrics)
    return engine, worker, prefix


def make_batcher(run_batch: Callable[[list], list], config: ModelServiceConfig,
                 metrics: ServiceMetrics | None) -> DynamicBatcher:
    """The engine's batcher: items cost their tokens; a lone caller runs at once, callers that
    arrive together wait up to max_wait_ms for each other."""
    return DynamicBatcher(run_batch, cost=lambda item: item.cost,
                          max_batch_tokens=config.max_batch_tokens,
                          max_wait_ms=config.max_wait_ms,
                          on_batch=metrics.observe_batch if metrics else None,
                          wait_only_when_busy=True)


class ServicerProxy:
    """Registered with the server before the model is loaded; forwards to the real servicer.

    Until the target exists every method answers UNAVAILABLE (health says NOT_SERVING)."""

    def __init__(self):
        self.target = None

    def __getattr__(self, name):
        async def call(request, context):
            if self.target is None:
                import grpc

                await context.abort(grpc.StatusCode.UNAVAILABLE, "model is still loading")
            return await getattr(self.target, name)(request, context)

        return call


def run(coro: Awaitable) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        asyncio.run(coro)
    except KeyboardInterrupt:
        pass
