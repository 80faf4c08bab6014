"""Start-up shared by the draft and verify services: serve health first, load, then SERVING.

A service describes itself once (`ServiceSpec`); everything else is here:

    SPEC = ServiceSpec("specmesh serve verify", verify_pb2, "VerifyService",
                       verify_pb2_grpc.add_VerifyServiceServicer_to_server,
                       VerifyEngine, VerifyEngine.verify_batch, VerifyServicer)
    main(SPEC)                               # the process: flags, bind, load, serve until signal
    servicer = await build_servicer(SPEC, config)   # in-process (tests)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from specmesh.model_service.batcher import DynamicBatcher
from specmesh.model_service.config import ModelServiceConfig, parse_service_args
from specmesh.model_service.prefix_cache import make_prefix_cache
from specmesh.model_service.servicer import ModelServicer
from specmesh.wire.metrics import MetricsInterceptor, ServiceMetrics, start_metrics_server
from specmesh.wire.progress import progress
from specmesh.wire.server import build_server, run, serve_until_signal


@dataclass(frozen=True)
class ServiceSpec:
    prog: str  # shown in --help
    pb2: ModuleType  # the service's *_pb2 module
    service: str  # its service name in the proto ("VerifyService")
    add_to_server: Callable  # the generated add_*Servicer_to_server
    engine: type  # SequenceEngine subclass, built as engine(loaded, config.engine)
    run_batch: Callable  # unbound engine method: run_batch(engine, items) -> outcomes
    servicer: type[ModelServicer]
    defaults: Mapping[str, Any] = field(default_factory=dict)  # this service's own flag defaults
    # the service's own servicer keywords from its config (the draft's fleet n-gram table)
    servicer_options: Callable[[ModelServiceConfig], dict[str, Any]] | None = None

    @property
    def short_name(self) -> str:
        """"verify" / "draft": the `service` label of its metrics (the gateway's is "gateway")."""
        return self.service.removesuffix("Service").lower()

    @property
    def full_name(self) -> str:
        return self.pb2.DESCRIPTOR.services_by_name[self.service].full_name


def main(spec: ServiceSpec, argv: list[str] | None = None) -> None:
    run(serve(spec, parse_service_args(spec.prog, argv, spec.defaults)))


async def serve(spec: ServiceSpec, config: ModelServiceConfig) -> None:
    """Bind (health NOT_SERVING), build the servicer (loads the model), report SERVING, run
    until SIGINT/SIGTERM, stop gracefully. Metrics on `config.metrics_port` when set."""
    metrics = ServiceMetrics(spec.short_name)
    if config.metrics_port is not None:
        port = start_metrics_server(config.metrics_port, metrics, config.metrics_host)
        print(f"metrics on http://{config.metrics_host}:{port}/metrics", flush=True)
    proxy = ServicerProxy(spec.servicer)
    server = await build_server([(spec.add_to_server, proxy)], [spec.full_name],
                                port=config.port, host=config.host,
                                interceptors=[MetricsInterceptor(metrics)],
                                max_message_bytes=int(config.max_message_mb * (1 << 20)),
                                security=config.security)
    await server.start()
    print(f"{spec.full_name} listening on {config.host}:{server.port}", flush=True)
    proxy.target = await build_servicer(spec, config, metrics)
    await server.set_serving(True)
    await serve_until_signal(server, ready_line=f"SERVING {config.host}:{server.port}")
    await proxy.target.close()


async def build_servicer(spec: ServiceSpec, config: ModelServiceConfig,
                         metrics: ServiceMetrics | None = None) -> ModelServicer:
    """Load the model and build the engine on the batcher's one thread, where every forward
    runs: all torch work of the process on one thread (a second thread's OpenMP team put
    libgomp in throttled-spin mode, ~1.5x slower). Then wrap it in the servicer."""
    if spec.short_name != "draft" and (config.method == "ngram" or config.ngram_fleet_key):
        raise ValueError("--method ngram and --ngram-fleet-key are for the draft service only")
    if spec.short_name != "draft" and config.quantize != "none":
        raise ValueError(f"--quantize {config.quantize}: for the draft service only (the "
                         "verifier's weights are the target model's own)")
    options = spec.servicer_options(config) if spec.servicer_options else {}
    if config.method == "ngram":  # a model-free draft service: nothing to load
        return spec.servicer(None, None, None, metrics, **options)
    from specmesh.kernels import load_for_service  # torch loads here, after tune_openmp()

    engine = None
    worker = make_batcher(lambda items: spec.run_batch(engine, items), config, metrics)
    loaded = await worker.call(load_for_service, config.model, config.dtype, config.device,
                               config.threads, config.batch_invariant, progress,
                               config.quantize)
    engine = await worker.call(spec.engine, loaded, config.engine)
    prefix = make_prefix_cache(config.cache_addr, loaded.fingerprint, config.prefix_chunk_size,
                               lambda *args: worker.call(engine.export_prefix, *args), metrics,
                               config.security)
    return spec.servicer(engine, worker, prefix, metrics, **options)


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
    """Registered with the server before the model is loaded; forwards to the real servicer
    (of class `servicer`: its streaming methods are forwarded as streams).

    Until the target exists every method answers UNAVAILABLE (health says NOT_SERVING)."""

    def __init__(self, servicer: type | None = None):
        self.target = None
        self.servicer = servicer

    async def _ready(self, context) -> None:
        if self.target is None:
            import grpc

            await context.abort(grpc.StatusCode.UNAVAILABLE, "model is still loading")

    def __getattr__(self, name):
        if inspect.isasyncgenfunction(getattr(self.servicer, name, None)):
            async def stream(request, context):
                await self._ready(context)
                async for reply in getattr(self.target, name)(request, context):
                    yield reply
            return stream

        async def call(request, context):
            await self._ready(context)
            return await getattr(self.target, name)(request, context)

        return call
