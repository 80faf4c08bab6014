"""RoundStream: a round's batch calls over one open bidi stream, failing like unary calls.

A real gRPC server on port 0 with the services' interceptors (errors, metrics) and a small
VerifyService whose VerifyBatch echoes each item's sequence id; ids ask it to misbehave:
"slow" (never answers in time), "bad" (INVALID_ARGUMENT for the whole batch).
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from specmesh.clients.round_stream import RoundStream, batch_method
from specmesh.model_service.startup import ServicerProxy
from specmesh.v1 import common_pb2, verify_pb2, verify_pb2_grpc
from specmesh.wire.errors import InvalidRequest
from specmesh.wire.metrics import MetricsInterceptor, ServiceMetrics
from specmesh.wire.server import build_server


class Echo(verify_pb2_grpc.VerifyServiceServicer):
    """VerifyBatch answers every item with its id's length as the one token."""

    def __init__(self):
        self.streams_opened = 0
        self.batches = 0

    async def VerifyBatch(self, request, context):
        self.batches += 1
        ids = [r.header.sequence_id for r in request.requests]
        if "slow" in ids:
            await asyncio.sleep(30)
        if "wait" in ids:
            await asyncio.sleep(0.5)
        if "bad" in ids:
            raise InvalidRequest("requests[0].header.sequence_id", "asked to fail")
        return verify_pb2.VerifyBatchResponse(results=[
            verify_pb2.VerifyResult(response=verify_pb2.VerifyResponse(tokens=[len(s)]))
            for s in ids])


class EchoStream(Echo):
    async def VerifyStream(self, request_iterator, context):
        self.streams_opened += 1
        async for request in request_iterator:
            yield await self.VerifyBatch(request, context)


def batch(*ids: str) -> verify_pb2.VerifyBatchRequest:
    return verify_pb2.VerifyBatchRequest(requests=[
        verify_pb2.VerifyRequest(header=common_pb2.SequenceHeader(sequence_id=s)) for s in ids])


def tokens(reply) -> list[int]:
    return [r.response.tokens[0] for r in reply.results]


@pytest.fixture
async def serve():
    servers = []

    async def start(servicer, metrics=None, server_out=None):
        interceptors = [MetricsInterceptor(metrics)] if metrics else []
        server = await build_server([(verify_pb2_grpc.add_VerifyServiceServicer_to_server,
                                      servicer)], [], port=0, interceptors=interceptors)
        await server.start()
        servers.append(server)
        if server_out is not None:
            server_out.append(server)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        servers.append(channel)
        return verify_pb2_grpc.VerifyServiceStub(channel)

    yield start
    for s in reversed(servers):
        await (s.close() if isinstance(s, grpc.aio.Channel) else s.stop(0))


async def test_calls_share_one_stream_and_are_counted_per_request(serve):
    metrics = ServiceMetrics("verify")
    servicer = EchoStream()
    stub = await serve(servicer, metrics)
    call = batch_method(stub, "VerifyBatch")
    assert isinstance(call, RoundStream)
    for n in range(1, 6):
        assert tokens(await call(batch("a" * n, "bb"), timeout=5)) == [n, 2]
    assert (call.num_opened, servicer.streams_opened, servicer.batches) == (1, 1, 5)
    count = metrics.registry.get_sample_value(
        "specmesh_request_latency_seconds_count",
        {"service": "verify", "method": "VerifyService/VerifyStream", "code": "OK"})
    assert count == 5
    call.close()


async def test_a_timeout_is_deadline_exceeded_and_the_next_call_gets_its_own_reply(serve):
    servicer = EchoStream()
    call = batch_method(await serve(servicer), "VerifyBatch")
    assert tokens(await call(batch("x"), timeout=5)) == [1]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(batch("slow"), timeout=0.2)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert tokens(await call(batch("four"), timeout=5)) == [4]
    assert call.num_opened == 2
    call.close()


async def test_a_cancelled_call_drops_its_stream(serve):
    call = batch_method(await serve(EchoStream()), "VerifyBatch")
    slow = asyncio.ensure_future(call(batch("slow"), timeout=None))
    await asyncio.sleep(0.2)
    slow.cancel()
    with pytest.raises(asyncio.CancelledError):
        await slow
    assert tokens(await call(batch("abc"), timeout=5)) == [3]  # not the slow one's reply
    assert call.num_opened == 2
    call.close()


async def test_a_failed_batch_fails_that_call_with_its_status_only(serve):
    metrics = ServiceMetrics("verify")
    call = batch_method(await serve(EchoStream(), metrics), "VerifyBatch")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(batch("bad"), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "requests[0].header.sequence_id" in info.value.details()
    assert tokens(await call(batch("ok"), timeout=5)) == [2]
    errors = metrics.registry.get_sample_value(
        "specmesh_request_errors_total",
        {"service": "verify", "method": "VerifyService/VerifyStream",
         "code": "INVALID_ARGUMENT"})
    assert errors == 1
    call.close()


async def test_a_service_without_the_stream_is_called_unary(serve):
    servicer = Echo()  # VerifyStream: the generated base answers UNIMPLEMENTED
    call = batch_method(await serve(servicer), "VerifyBatch")
    assert tokens(await call(batch("ab"), timeout=5)) == [2]
    assert tokens(await call(batch("abc"), timeout=5)) == [3]
    assert call.streaming is False and servicer.batches == 2


async def test_a_stub_without_the_stream_method_keeps_its_own_call():
    class Replicas:
        async def VerifyBatch(self, request, timeout=None):  # noqa: N802
            return "unary"

    replicas = Replicas()
    assert await batch_method(replicas, "VerifyBatch")(batch("a")) == "unary"


async def test_the_loading_proxy_forwards_streams(serve):
    proxy = ServicerProxy(EchoStream)
    call = batch_method(await serve(proxy), "VerifyBatch")
    with pytest.raises(grpc.aio.AioRpcError) as info:  # no model yet
        await call(batch("a"), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    proxy.target = EchoStream()
    assert tokens(await call(batch("abcde"), timeout=5)) == [5]
    assert call.streaming is True
    call.close()


async def test_a_graceful_stop_ends_open_streams_without_waiting_out_its_grace(serve):
    """An idle stream is ended at once, a busy one right after its answer; the client then
    sees UNAVAILABLE (the path a stopped service takes for unary calls)."""
    loop = asyncio.get_running_loop()
    for busy in (False, True):
        out: list = []
        idle_call = batch_method(await serve(EchoStream(), server_out=out), "VerifyBatch")
        assert tokens(await idle_call(batch("ab"), timeout=5)) == [2]
        pending = asyncio.ensure_future(idle_call(batch("wait"), timeout=5)) if busy else None
        await asyncio.sleep(0.1)
        start = loop.time()
        await out[0].stop(grace=10)
        assert loop.time() - start < 3
        if busy:
            assert tokens(await pending) == [4]  # answered before the stream ended
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await idle_call(batch("x"), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
