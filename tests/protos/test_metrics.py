"""ServiceMetrics, the /metrics HTTP endpoint and the gRPC MetricsInterceptor."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from specmesh.model_service.batcher import DynamicBatcher
from specmesh.wire.errors import CapacityExhausted, InvalidRequest
from specmesh.wire.metrics import MetricsInterceptor, ServiceMetrics, start_metrics_server
from specmesh.wire.server import build_server


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """GET /metrics and index every sample by (name, labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(samples, name: str, **labels) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def test_scrape_shows_every_family():
    metrics = ServiceMetrics("verify")
    port = start_metrics_server(0, metrics.registry, addr="127.0.0.1")
    assert port > 0
    metrics.observe_request("VerifyService/Verify", "OK", 0.003)
    metrics.observe_request("VerifyService/Verify", "RESOURCE_EXHAUSTED", 0.001)
    metrics.observe_batch(num_items=3, num_tokens=40, seconds=0.5)
    metrics.observe_round(num_drafted=4, num_accepted=3)
    metrics.observe_round(num_drafted=4, num_accepted=1)
    metrics.set_kv_blocks(used=12, free=52)
    metrics.set_queue_depth(5)
    metrics.observe_cache("prefix", hit=True)
    metrics.observe_cache("prefix", hit=False)
    metrics.observe_cache("prefix", hit=True)

    s = scrape(port)
    svc = {"service": "verify"}
    ok = dict(svc, method="VerifyService/Verify", code="OK")
    full = dict(svc, method="VerifyService/Verify", code="RESOURCE_EXHAUSTED")
    assert value(s, "specmesh_request_latency_seconds_count", **ok) == 1
    assert value(s, "specmesh_request_latency_seconds_sum", **ok) == pytest.approx(0.003)
    assert value(s, "specmesh_request_latency_seconds_count", **full) == 1
    assert value(s, "specmesh_request_errors_total", **full) == 1
    assert value(s, "specmesh_request_errors_total", **ok) is None  # OK is not an error
    assert value(s, "specmesh_batch_size_sum", **svc) == 3
    assert value(s, "specmesh_batch_size_bucket", **svc, le="4.0") == 1
    assert value(s, "specmesh_batch_size_bucket", **svc, le="2.0") == 0
    assert value(s, "specmesh_batch_tokens_sum", **svc) == 40
    assert value(s, "specmesh_batch_seconds_count", **svc) == 1
    assert value(s, "specmesh_tokens_total", **svc) == 40
    assert value(s, "specmesh_tokens_per_second", **svc) == pytest.approx(80.0)
    assert value(s, "specmesh_draft_tokens_total", **svc) == 8
    assert value(s, "specmesh_accepted_tokens_total", **svc) == 4
    assert value(s, "specmesh_accepted_per_round_count", **svc) == 2
    assert value(s, "specmesh_accepted_per_round_bucket", **svc, le="1.0") == 1
    assert value(s, "specmesh_accepted_per_round_bucket", **svc, le="3.0") == 2
    assert value(s, "specmesh_kv_blocks_used", **svc) == 12
    assert value(s, "specmesh_kv_blocks_free", **svc) == 52
    assert value(s, "specmesh_queue_depth", **svc) == 5
    assert value(s, "specmesh_cache_requests_total", **svc, kind="prefix", result="hit") == 2
    assert value(s, "specmesh_cache_requests_total", **svc, kind="prefix", result="miss") == 1


def test_services_can_share_one_registry():
    registry = CollectorRegistry()
    draft, verify = ServiceMetrics("draft", registry), ServiceMetrics("verify", registry)
    draft.observe_batch(2, 10, 0.1)
    verify.observe_batch(4, 30, 0.1)
    port = start_metrics_server(0, registry, addr="127.0.0.1")
    s = scrape(port)
    assert value(s, "specmesh_batch_tokens_sum", service="draft") == 10
    assert value(s, "specmesh_batch_tokens_sum", service="verify") == 30


def test_separate_metrics_do_not_collide():
    a, b = ServiceMetrics("gateway"), ServiceMetrics("gateway")
    a.set_queue_depth(1)
    b.set_queue_depth(2)
    assert a.registry is not b.registry


async def test_batcher_feeds_batch_metrics():
    metrics = ServiceMetrics("draft")
    batcher = DynamicBatcher(lambda xs: xs, cost=lambda x: x, max_batch_tokens=100,
                             max_wait_ms=50, on_batch=metrics.observe_batch)
    await asyncio.gather(*(batcher.submit(i) for i in (3, 4, 5)))
    await batcher.stop()
    s = scrape(start_metrics_server(0, metrics, addr="127.0.0.1"))
    assert value(s, "specmesh_batch_size_sum", service="draft") == 3
    assert value(s, "specmesh_batch_tokens_sum", service="draft") == 12


# -- the interceptor over a real server ---------------------------------------------------------
async def _ok(request, context):
    return b"pong:" + request


async def _invalid(request, context):
    raise InvalidRequest("prompt", "empty prompt")


async def _boom(request, context):
    raise RuntimeError("bug")


async def _abort(request, context):
    await context.abort(grpc.StatusCode.NOT_FOUND, "no such sequence")


async def _stream(request, context):
    for i in range(3):
        yield bytes([i])


async def _stream_full(request, context):
    yield b"x"
    raise CapacityExhausted("kv cache full")


def _add_echo(_servicer, server):
    handlers = {
        "Ok": grpc.unary_unary_rpc_method_handler(_ok),
        "Invalid": grpc.unary_unary_rpc_method_handler(_invalid),
        "Boom": grpc.unary_unary_rpc_method_handler(_boom),
        "Abort": grpc.unary_unary_rpc_method_handler(_abort),
        "Stream": grpc.unary_stream_rpc_method_handler(_stream),
        "StreamFull": grpc.unary_stream_rpc_method_handler(_stream_full),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.v1.Echo",
                                                                          handlers),))


async def test_interceptor_records_latency_and_status_per_method():
    metrics = ServiceMetrics("gateway")
    server = await build_server([(_add_echo, None)], service_names=["test.v1.Echo"],
                                interceptors=[MetricsInterceptor(metrics)])
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            assert await ch.unary_unary("/test.v1.Echo/Ok")(b"a") == b"pong:a"
            assert await ch.unary_unary("/test.v1.Echo/Ok")(b"b") == b"pong:b"
            expected = {"Invalid": grpc.StatusCode.INVALID_ARGUMENT,
                        "Boom": grpc.StatusCode.INTERNAL,
                        "Abort": grpc.StatusCode.NOT_FOUND}
            for name, code in expected.items():
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await ch.unary_unary(f"/test.v1.Echo/{name}")(b"")
                assert err.value.code() == code  # the error interceptor still maps it
            got = [m async for m in ch.unary_stream("/test.v1.Echo/Stream")(b"")]
            assert got == [b"\x00", b"\x01", b"\x02"]
            call = ch.unary_stream("/test.v1.Echo/StreamFull")(b"")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in call:
                    pass
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        await server.stop(0)

    s = scrape(start_metrics_server(0, metrics, addr="127.0.0.1"))

    def count(method, code):
        return value(s, "specmesh_request_latency_seconds_count", service="gateway",
                     method=f"Echo/{method}", code=code)

    def errors(method, code):
        return value(s, "specmesh_request_errors_total", service="gateway",
                     method=f"Echo/{method}", code=code)

    assert count("Ok", "OK") == 2
    assert count("Invalid", "INVALID_ARGUMENT") == 1 and errors("Invalid", "INVALID_ARGUMENT") == 1
    assert count("Boom", "INTERNAL") == 1 and errors("Boom", "INTERNAL") == 1
    assert count("Abort", "NOT_FOUND") == 1 and errors("Abort", "NOT_FOUND") == 1
    assert count("Stream", "OK") == 1
    assert count("StreamFull", "RESOURCE_EXHAUSTED") == 1
    assert errors("Ok", "OK") is None
