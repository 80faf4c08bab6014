"""Prometheus metrics shared by every service and the gateway (no torch).

    metrics = ServiceMetrics("verify")
    port = start_metrics_server(config.metrics_port, metrics.registry)  # 0 = a free port
    server = await build_server(..., interceptors=[MetricsInterceptor(metrics)])
    batcher = DynamicBatcher(..., on_batch=metrics.observe_batch)

Every series carries a `service` label. Each `ServiceMetrics` registers its families in its own
`CollectorRegistry` unless one is passed; several services may share one registry (the families
are registered once and told apart by `service`).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from specmesh.wire.errors import SpecMeshError, status_code

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0, 30.0, 60.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TOKEN_BUCKETS = (1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
ACCEPTED_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32)


def _family(registry: CollectorRegistry, cls, name: str, doc: str, labels: tuple[str, ...],
            **kwargs):
    """Register a metric family in `registry`, or return the one already registered there."""
    try:
        return cls(name, doc, labelnames=labels, registry=registry, **kwargs)
    except ValueError:  # duplicated timeseries: another ServiceMetrics shares this registry
        existing = registry._names_to_collectors.get(name)  # noqa: SLF001 - no public lookup
        if existing is None:
            existing = registry._names_to_collectors.get(f"{name}_total")  # noqa: SLF001
        if existing is None:
            raise
        return existing


class ServiceMetrics:
    """The metric families of one service, pre-bound to its `service` label."""

    def __init__(self, service_name: str, registry: CollectorRegistry | None = None):
        self.service = service_name
        self._children: dict[tuple, object] = {}
        self.registry = registry if registry is not None else CollectorRegistry()
        r, s = self.registry, ("service",)
        self.request_latency = _family(
            r, Histogram, "specmesh_request_latency_seconds",
            "gRPC request latency by method and status code", s + ("method", "code"),
            buckets=LATENCY_BUCKETS)
        self.request_errors = _family(
            r, Counter, "specmesh_request_errors", "gRPC requests that ended with a non-OK code",
            s + ("method", "code"))
        self.batch_size = _family(
            r, Histogram, "specmesh_batch_size", "items merged into one forward", s,
            buckets=BATCH_SIZE_BUCKETS)
        self.batch_tokens = _family(
            r, Histogram, "specmesh_batch_tokens", "tokens per forward", s, buckets=TOKEN_BUCKETS)
        self.batch_seconds = _family(
            r, Histogram, "specmesh_batch_seconds", "time of one batched forward", s,
            buckets=LATENCY_BUCKETS)
        self.tokens = _family(
            r, Counter, "specmesh_tokens", "tokens processed (services) or generated (gateway)", s)
        self.tokens_per_second = _family(
            r, Gauge, "specmesh_tokens_per_second", "throughput of the latest batch or window", s)
        self.draft_tokens = _family(
            r, Counter, "specmesh_draft_tokens", "draft tokens proposed for verification", s)
        self.accepted_tokens = _family(
            r, Counter, "specmesh_accepted_tokens", "draft tokens accepted by the target", s)
        self.accepted_per_round = _family(
            r, Histogram, "specmesh_accepted_per_round", "draft tokens accepted per round", s,
            buckets=ACCEPTED_BUCKETS)
        self.kv_blocks_used = _family(
            r, Gauge, "specmesh_kv_blocks_used", "KV cache blocks holding sequences", s)
        self.kv_blocks_free = _family(
            r, Gauge, "specmesh_kv_blocks_free", "KV cache blocks in the free pool", s)
        self.queue_depth = _family(
            r, Gauge, "specmesh_queue_depth", "items waiting for a batch (or requests waiting)", s)
        g = s + ("model", "priority")
        self.ttft = _family(
            r, Histogram, "specmesh_time_to_first_token_seconds",
            "from a request's arrival to its first token, by model and priority class", g,
            buckets=LATENCY_BUCKETS)
        self.tpot = _family(
            r, Histogram, "specmesh_time_per_output_token_seconds",
            "mean time per generated token after the first, by model and priority class", g,
            buckets=LATENCY_BUCKETS)
        self.queue_wait = _family(
            r, Histogram, "specmesh_queue_wait_seconds",
            "from a request's arrival to the first round that ran it", g, buckets=LATENCY_BUCKETS)
        self.generated_tokens = _family(
            r, Counter, "specmesh_generated_tokens", "tokens generated, by model and priority", g)
        self.generation_tps = _family(
            r, Histogram, "specmesh_generation_tokens_per_second",
            "one request's generated tokens / its total time", g,
            buckets=(1, 5, 10, 25, 50, 100, 200, 400, 800, 1600))
        self.cache_requests = _family(
            r, Counter, "specmesh_cache_requests", "cache look-ups by kind and result (hit/miss)",
            s + ("kind", "result"))

    # -- recording -------------------------------------------------------------------------
    def _of(self, family, *labels: str):
        """`family`'s child for (service, *labels), looked up once (a `labels()` call costs
        ~2 us, and a batch records several per item)."""
        key = (family, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = family.labels(self.service, *labels)
        return child

    def observe_request(self, method: str, code: str, seconds: float) -> None:
        """One finished RPC; `code` is a status name ("OK", "NOT_FOUND", ...)."""
        self._of(self.request_latency, method, code).observe(seconds)
        if code != "OK":
            self._of(self.request_errors, method, code).inc()

    def observe_batch(self, num_items: int, num_tokens: int, seconds: float) -> None:
        """One batched forward; the signature of DynamicBatcher's `on_batch`."""
        self._of(self.batch_size).observe(num_items)
        self._of(self.batch_tokens).observe(num_tokens)
        self._of(self.batch_seconds).observe(seconds)
        self.observe_tokens(num_tokens, seconds)

    def observe_tokens(self, num_tokens: int, seconds: float) -> None:
        """Count tokens and set the tokens/s gauge from this span."""
        self._of(self.tokens).inc(num_tokens)
        if seconds > 0:
            self._of(self.tokens_per_second).set(num_tokens / seconds)

    def observe_round(self, num_drafted: int, num_accepted: int) -> None:
        """One speculation round of one sequence."""
        self._of(self.draft_tokens).inc(num_drafted)
        self._of(self.accepted_tokens).inc(num_accepted)
        self._of(self.accepted_per_round).observe(num_accepted)

    def observe_generation(self, model: str, priority: str, num_tokens: int, ttft_s: float,
                           total_s: float, queue_s: float) -> None:
        """One finished generation (gateway): TTFT, time per output token, queue wait,
        tokens and tokens/s, labelled by the model (name@version) and the priority class."""
        labels = (model, priority)
        self._of(self.ttft, *labels).observe(ttft_s)
        self._of(self.queue_wait, *labels).observe(queue_s)
        self._of(self.generated_tokens, *labels).inc(num_tokens)
        if num_tokens > 1:
            self._of(self.tpot, *labels).observe((total_s - ttft_s) / (num_tokens - 1))
        if total_s > 0:
            self._of(self.generation_tps, *labels).observe(num_tokens / total_s)

    def set_kv_blocks(self, used: int, free: int) -> None:
        self._of(self.kv_blocks_used).set(used)
        self._of(self.kv_blocks_free).set(free)

    def set_queue_depth(self, depth: int) -> None:
        self._of(self.queue_depth).set(depth)

    def observe_cache(self, kind: str, hit: bool) -> None:
        """One cache look-up (`kind`: "prefix", "result", ...)."""
        self._of(self.cache_requests, kind, "hit" if hit else "miss").inc()


def start_metrics_server(port: int, registry: CollectorRegistry | ServiceMetrics,
                         addr: str = "127.0.0.1") -> int:
    """Serve `registry` at http://addr:port/metrics from a daemon thread; return the bound port
    (port 0 picks a free one)."""
    if isinstance(registry, ServiceMetrics):
        registry = registry.registry
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    return server.server_port


# -- the gRPC side -------------------------------------------------------------------------
def _code_name(code) -> str:
    if code is None:
        return "OK"
    if isinstance(code, grpc.StatusCode):
        return code.name
    for c in grpc.StatusCode:  # the aio context may report the raw integer
        if c.value[0] == code:
            return c.name
    return str(code)


def status_of(exc: BaseException | None, context) -> str:
    """The status name an RPC ends with, seen from inside the error interceptor's wrapper:
    SpecMeshError -> its code (what ErrorInterceptor will send), abort -> the context's code,
    cancellation (or a stream closed early) -> CANCELLED, anything else -> INTERNAL,
    no exception -> the context's code (OK unless the servicer set one)."""
    if exc is None or isinstance(exc, grpc.aio.AbortError):
        try:
            return _code_name(context.code())
        except Exception:  # noqa: BLE001 - older grpc without ServicerContext.code()
            return "OK" if exc is None else "UNKNOWN"
    if isinstance(exc, SpecMeshError):
        return status_code(exc).name
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return "CANCELLED"
    return "INTERNAL"


def _short_method(full: str) -> str:
    """'/specmesh.v1.VerifyService/Verify' -> 'VerifyService/Verify'."""
    service, _, method = full.lstrip("/").partition("/")
    return f"{service.rsplit('.', 1)[-1]}/{method}"


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Records latency and final status per method for every RPC kind.

    Pass it to `build_server(..., interceptors=[MetricsInterceptor(metrics)])`: it runs inside
    the ErrorInterceptor, so it sees the servicer's own exceptions and labels them with the code
    the ErrorInterceptor will send; it re-raises everything unchanged.
    """

    def __init__(self, metrics: ServiceMetrics, clock: Callable[[], float] = time.perf_counter):
        self.metrics = metrics
        self.clock = clock

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = _short_method(handler_call_details.method)
        kinds = (("unary_unary", grpc.unary_unary_rpc_method_handler, self._wrap_unary),
                 ("unary_stream", grpc.unary_stream_rpc_method_handler, self._wrap_stream),
                 ("stream_unary", grpc.stream_unary_rpc_method_handler, self._wrap_unary),
                 ("stream_stream", grpc.stream_stream_rpc_method_handler, self._wrap_bidi))
        for attr, make, wrap in kinds:
            inner = getattr(handler, attr)
            if inner is not None:
                return make(wrap(inner, method), handler.request_deserializer,
                            handler.response_serializer)
        return handler

    def _record(self, method: str, start: float, exc: BaseException | None, context) -> None:
        self.metrics.observe_request(method, status_of(exc, context), self.clock() - start)

    def _wrap_unary(self, inner, method: str):
        async def unary(request, context):
            start = self.clock()
            try:
                reply = await inner(request, context)
            except BaseException as exc:
                self._record(method, start, exc, context)
                raise
            self._record(method, start, None, context)
            return reply

        return unary

    def _wrap_stream(self, inner, method: str):
        async def stream(request, context):
            start = self.clock()
            try:
                async for item in inner(request, context):
                    yield item
            except BaseException as exc:
                self._record(method, start, exc, context)
                raise
            self._record(method, start, None, context)

        return stream

    def _wrap_bidi(self, inner, method: str):
        """A stream answering each request with one response, in order (VerifyStream,
        ProposeStream): each answer is one request of `method`, timed from its request's
        arrival; a stream closed by its client between requests records nothing."""
        async def bidi(requests, context):
            arrived: deque[float] = deque()

            async def timed():
                async for request in requests:
                    arrived.append(self.clock())
                    yield request

            try:
                async for item in inner(timed(), context):
                    self._record(method, arrived.popleft() if arrived else self.clock(),
                                 None, context)
                    yield item
            except BaseException as exc:
                if arrived or not isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
                    self._record(method, arrived[0] if arrived else self.clock(), exc, context)
                raise

        return bidi
