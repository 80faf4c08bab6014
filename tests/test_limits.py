"""Each size limit answers with its status, and the service keeps serving others meanwhile.

A good request running next to a burst of over-limit ones must finish within 2x its usual time
(plus a fixed allowance for this shared 2-core machine's scheduling noise).
"""

from __future__ import annotations

import asyncio
import statistics
import time

import grpc
import pytest

from specmesh.cache_service.__main__ import start_server as start_cache
from specmesh.cache_service.config import CacheServiceConfig
from specmesh.v1 import cache_pb2, cache_pb2_grpc, common_pb2, verify_pb2, verify_pb2_grpc
from specmesh.wire.server import CHANNEL_OPTIONS
from tests.conftest import TINY_TARGET
from tests.stack import model_server

EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
NOISE_S = 0.25


def verify(seq: str, tokens) -> verify_pb2.VerifyRequest:
    return verify_pb2.VerifyRequest(header=common_pb2.SequenceHeader(
        sequence_id=seq, num_cached_tokens=0, new_tokens=tokens))


async def timed(coro) -> float:
    start = time.perf_counter()
    await coro
    return time.perf_counter() - start


async def usual_and_under_load(good, bad, burst: int = 8) -> tuple[float, float, list]:
    """(median time of `good()` alone, its time next to `burst` calls of `bad()`, their errors)."""
    usual = statistics.median([await timed(good()) for _ in range(5)])
    outcomes = await asyncio.gather(timed(good()), *(bad() for _ in range(burst)),
                                    return_exceptions=True)
    return usual, outcomes[0], outcomes[1:]


@pytest.mark.models
async def test_verify_message_size_limit(models):
    async with model_server("verify", models / TINY_TARGET, max_message_mb=0.25) as (addr, _):
        async with grpc.aio.insecure_channel(addr, options=CHANNEL_OPTIONS) as ch:
            stub = verify_pb2_grpc.VerifyServiceStub(ch)
            n = 0

            async def good():
                nonlocal n
                n += 1
                reply = await stub.Verify(verify(f"good-{n}", [1, 403, 407]))
                assert reply.tokens
                await stub.Release(verify_pb2.VerifyReleaseRequest(sequence_ids=[f"good-{n}"]))

            async def bad():
                await stub.Verify(verify("huge", [300] * 200_000))  # ~400 KB > 256 KiB

            usual, loaded, errors = await usual_and_under_load(good, bad)
            assert all(isinstance(e, grpc.aio.AioRpcError) and e.code() == EXHAUSTED
                       for e in errors), errors
            assert loaded <= 2 * usual + NOISE_S, (usual, loaded)


async def test_cache_message_size_limit(redis_server):
    config = CacheServiceConfig(redis_url=redis_server.url, max_message_bytes=256 << 10,
                                piece_bytes=64 << 10)
    server, servicer = await start_cache(config)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}",
                                             options=CHANNEL_OPTIONS) as ch:
            stub = cache_pb2_grpc.CacheServiceStub(ch)

            async def good():
                await stub.Stats(cache_pb2.StatsRequest())

            async def bad():
                await stub.LookupPrefix(cache_pb2.LookupPrefixRequest(
                    fingerprint="m", chunk_size=16, token_ids=[300] * 200_000))

            usual, loaded, errors = await usual_and_under_load(good, bad)
            assert all(isinstance(e, grpc.aio.AioRpcError) and e.code() == EXHAUSTED
                       for e in errors), errors
            assert loaded <= 2 * usual + NOISE_S, (usual, loaded)
    finally:
        await server.stop(0)
        await servicer.close()


def test_piece_size_must_fit_the_message_limit():
    with pytest.raises(ValueError, match="piece_bytes"):
        CacheServiceConfig(max_message_bytes=1 << 20, piece_bytes=1 << 20)
