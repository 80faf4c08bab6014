"""python -m specmesh.cache_service --redis-url redis://HOST:PORT/0 [--port P] ... (`specmesh serve cache`).

Prints `specmesh.v1.CacheService listening on HOST:PORT`, then `SERVING HOST:PORT`; stops
gracefully on SIGINT/SIGTERM. A Redis that is down at start (or later) only makes every answer a
miss; the service itself keeps serving.
"""

from __future__ import annotations

import logging

from specmesh.cache_service.config import CacheServiceConfig, parse_args
from specmesh.cache_service.engine import CacheEngine
from specmesh.cache_service.servicer import CacheServicer
from specmesh.cache_service.stats import CacheStats, StatsCollector
from specmesh.cache_service.store import RedisStore
from specmesh.v1 import cache_pb2, cache_pb2_grpc
from specmesh.wire.metrics import MetricsInterceptor, ServiceMetrics, start_metrics_server
from specmesh.wire.server import Server, build_server, run, serve_until_signal

SERVICE_NAME = cache_pb2.DESCRIPTOR.services_by_name["CacheService"].full_name
log = logging.getLogger(__name__)


def build_servicer(config: CacheServiceConfig) -> CacheServicer:
    """Engine over a Redis client from `config.redis_url` (connects lazily), wrapped for gRPC."""
    store = RedisStore.from_url(config.redis_url, config.redis_timeout_s)
    return CacheServicer(CacheEngine(store, config), config.piece_bytes)


async def start_server(config: CacheServiceConfig, metrics: ServiceMetrics | None = None,
                       ) -> tuple[Server, CacheServicer]:
    """A started, SERVING cache server (port 0 binds a free one: see `Server.port`); RPCs are
    counted in `metrics` when given.

    The caller stops it: `await server.stop(grace); await servicer.close()`.
    """
    servicer = build_servicer(config)
    server = await build_server(
        [(cache_pb2_grpc.add_CacheServiceServicer_to_server, servicer)], [SERVICE_NAME],
        port=config.port, host=config.host, max_message_bytes=config.max_message_bytes,
        security=config.security,
        interceptors=[MetricsInterceptor(metrics)] if metrics is not None else ())
    await server.start()
    await server.set_serving(True)
    return server, servicer


def start_metrics(port: int, stats: CacheStats, metrics: ServiceMetrics,
                  host: str = "127.0.0.1") -> int:
    """Serve `stats` and the RPC metrics as Prometheus metrics on http://host:port/metrics (one
    registry, every series labelled service="cache"); return the bound port (0 = a free one)."""
    metrics.registry.register(StatsCollector(stats, metrics.service))
    return start_metrics_server(port, metrics, host)


async def serve(config: CacheServiceConfig) -> None:
    """Run the cache service until SIGINT/SIGTERM."""
    metrics = ServiceMetrics("cache") if config.metrics_port is not None else None
    server, servicer = await start_server(config, metrics)
    if metrics is not None:
        port = start_metrics(config.metrics_port, servicer.engine.stats, metrics,
                             config.metrics_host)
        print(f"metrics on http://{config.metrics_host}:{port}/metrics", flush=True)
    print(f"{SERVICE_NAME} listening on {config.host}:{server.port}", flush=True)
    try:
        await servicer.engine.store.ping()
    except Exception as exc:  # noqa: BLE001 - a dead Redis only means misses
        log.warning("redis at %s not reachable (%s); answering misses until it is",
                    config.redis_url, exc)
    await serve_until_signal(server, ready_line=f"SERVING {config.host}:{server.port}")
    await servicer.close()


def main(argv: list[str] | None = None) -> None:
    run(serve(parse_args(argv)))


if __name__ == "__main__":
    main()
