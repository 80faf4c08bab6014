"""CacheService end to end: a real gRPC server on port 0 over a real redis-server."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
import redis.asyncio as aioredis

from specmesh.cache_service import codec
from specmesh.cache_service.__main__ import start_server
from specmesh.cache_service.config import CacheServiceConfig
from specmesh.cache_service.keys import chunk_keys
from specmesh.cache_service.store import payload_key
from specmesh.v1 import cache_pb2, cache_pb2_grpc, common_pb2
from specmesh.wire.cache_client import CacheClient, PrefixHit, result_key
from specmesh.wire.server import CHANNEL_OPTIONS

pytestmark = pytest.mark.redis

FP = "target-fp"
CHUNK = 4
PIECE = 1024
SHAPE = (2, 2, CHUNK, 4, 16)  # [layers, k/v, chunk, heads, dim]: 2048 fp16 bytes > PIECE


@pytest.fixture
async def cache(redis_server):
    config = CacheServiceConfig(redis_url=redis_server.url, piece_bytes=PIECE, result_ttl_s=1,
                                redis_timeout_s=0.2, retry_after_s=0.3)
    server, servicer = await start_server(config)
    address = f"127.0.0.1:{server.port}"
    channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
    client = CacheClient(address, timeout_s=2.0)
    yield SimpleNamespace(client=client, stub=cache_pb2_grpc.CacheServiceStub(channel),
                          engine=servicer.engine, redis=redis_server, url=redis_server.url)
    await client.close()
    await channel.close()
    await server.stop(0.1)
    await servicer.close()


def _arrays(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(SHAPE).astype(np.float16) for _ in range(n)]


async def test_chunks_round_trip(cache):
    tokens = list(range(10, 24))  # 14 tokens: 3 full chunks + 2
    assert await cache.client.lookup_prefix(FP, tokens, CHUNK) == PrefixHit(0, ())
    arrays = _arrays(3)
    assert await cache.client.put_chunks(FP, tokens, CHUNK, 0, arrays[:2]) == 2
    assert await cache.client.put_chunks(FP, tokens, CHUNK, 2, arrays[2:]) == 1

    hit = await cache.client.lookup_prefix(FP, tokens, CHUNK)
    assert hit.num_tokens == 12 and hit.keys == tuple(chunk_keys(FP, tokens, CHUNK))
    got = await cache.client.get_chunks(FP, hit.keys)
    assert len(got) == 3
    for a, b in zip(got, arrays):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)

    # a shorter prompt shares the first chunk; another model shares nothing
    assert (await cache.client.lookup_prefix(FP, tokens[:7], CHUNK)).num_tokens == 4
    assert (await cache.client.lookup_prefix("other-fp", tokens, CHUNK)).num_tokens == 0
    # a different first chunk changes every key after it
    assert (await cache.client.lookup_prefix(FP, [99] + tokens[1:], CHUNK)).num_tokens == 0
    assert len(await cache.client.load_prefix(FP, tokens + [1, 2], CHUNK)) == 3


async def test_chunks_stream_in_pieces(cache):
    tokens = list(range(8))
    await cache.client.put_chunks(FP, tokens, CHUNK, 0, _arrays(2))
    keys = chunk_keys(FP, tokens, CHUNK)
    pieces = [p async for p in cache.stub.GetChunks(
        cache_pb2.GetChunksRequest(fingerprint=FP, chunk_keys=keys))]
    assert [(p.index, p.offset) for p in pieces] == [(0, 0), (0, PIECE), (1, 0), (1, PIECE)]
    assert all(len(p.data) <= PIECE for p in pieces)
    assert pieces[0].HasField("meta") and not pieces[1].HasField("meta")
    assert pieces[0].meta.dtype == "float16" and tuple(pieces[0].meta.shape) == SHAPE


async def test_big_chunk_round_trip(cache):
    """A chunk many pieces long (client piece size differs from the server's)."""
    big = np.random.default_rng(1).standard_normal((4, 2, CHUNK, 8, 64)).astype(np.float32)
    client = CacheClient(cache.client.address, timeout_s=2.0, piece_bytes=3000)
    assert await client.put_chunks(FP, list(range(CHUNK)), CHUNK, 0, [big]) == 1
    got = await client.get_chunks(FP, chunk_keys(FP, list(range(CHUNK)), CHUNK))
    np.testing.assert_array_equal(got[0], big)
    await client.close()


async def test_corrupt_and_foreign_entries_ignored(cache):
    tokens = list(range(16))
    keys = chunk_keys(FP, tokens, CHUNK)
    await cache.client.put_chunks(FP, tokens, CHUNK, 0, _arrays(4))
    direct = aioredis.from_url(cache.url)
    good = codec.decode_chunk(await direct.get(payload_key(keys[2])), FP)
    flipped = bytearray(good.data)
    flipped[0] ^= 1
    corrupt = codec.encode_chunk(FP, codec.ChunkData(good.dtype, good.shape, bytes(flipped),
                                                     good.sha256))
    await direct.set(payload_key(keys[2]), corrupt)
    got = await cache.client.get_chunks(FP, keys)
    assert len(got) == 2  # stops before the corrupt chunk: never loaded

    await direct.set(payload_key(keys[1]), codec.encode_chunk("other-fp", good))
    assert len(await cache.client.get_chunks(FP, keys)) == 1
    await direct.delete(payload_key(keys[0]))  # payload evicted, marker still there
    assert await cache.client.get_chunks(FP, keys) == []
    await direct.aclose()
    stats = await cache.client.server_stats()
    assert stats.chunks_rejected == 3 and stats.errors == 0


async def test_result_cache_with_ttl(cache):
    key = result_key(target_fingerprint=FP, draft_fingerprint="draft-fp",
                     prompt_token_ids=[1, 2, 3], max_new_tokens=8,
                     sampling=common_pb2.SamplingParams(temperature=0.0))
    assert await cache.client.get_result(key) is None
    assert await cache.client.put_result(key, [5, 6, 7], "eos")
    hit = await cache.client.get_result(key)
    assert hit.token_ids == [5, 6, 7] and hit.finish_reason == "eos"

    seeded = result_key(target_fingerprint=FP, prompt_token_ids=[1, 2, 3], max_new_tokens=8,
                        sampling=common_pb2.SamplingParams(temperature=0.8, seed=3))
    assert await cache.client.get_result(seeded) is None  # another key
    unseeded = result_key(target_fingerprint=FP, prompt_token_ids=[1, 2, 3], max_new_tokens=8,
                          sampling=common_pb2.SamplingParams(temperature=0.8))
    assert not await cache.client.put_result(unseeded, [1], "length")  # not deterministic
    assert cache.client.stats.skipped == 1

    await asyncio.sleep(1.3)  # result_ttl_s=1
    assert await cache.client.get_result(key) is None


async def test_stats_count(cache):
    tokens = list(range(8))
    await cache.client.lookup_prefix(FP, tokens, CHUNK)  # miss
    await cache.client.put_chunks(FP, tokens, CHUNK, 0, _arrays(2))
    hit = await cache.client.lookup_prefix(FP, tokens, CHUNK)  # hit
    await cache.client.get_chunks(FP, hit.keys)
    key = result_key(target_fingerprint=FP, prompt_token_ids=[1], max_new_tokens=2,
                     sampling=common_pb2.SamplingParams())
    await cache.client.get_result(key)  # miss
    await cache.client.put_result(key, [4, 5], "length")
    await cache.client.get_result(key)  # hit
    s = await cache.client.server_stats()
    assert (s.prefix_hits, s.prefix_misses, s.prefix_tokens_hit) == (1, 1, 8)
    assert (s.chunks_written, s.chunks_read, s.chunks_rejected) == (2, 2, 0)
    assert (s.result_hits, s.result_misses, s.results_written) == (1, 1, 1)
    assert s.bytes_read > 2 * 2048 and s.bytes_written > 2 * 2048 and s.errors == 0
    ops = {lat.op: lat for lat in s.latency}
    assert {"lookup_prefix", "get_chunks", "put_chunk", "get_result", "put_result"} <= set(ops)
    assert ops["lookup_prefix"].count == 2 and ops["lookup_prefix"].mean_ms > 0
    assert (cache.client.stats.hits, cache.client.stats.misses) == (2, 2)


def _piece(index=0, offset=0, data=b"", **meta) -> cache_pb2.PutChunksRequest:
    piece = cache_pb2.ChunkPiece(index=index, offset=offset, data=data)
    if meta:
        piece.meta.CopyFrom(cache_pb2.ChunkMeta(**meta))
    return cache_pb2.PutChunksRequest(piece=piece)


def _header(**kw) -> cache_pb2.PutChunksRequest:
    base = dict(fingerprint=FP, token_ids=list(range(8)), chunk_size=CHUNK, start_chunk=0)
    return cache_pb2.PutChunksRequest(header=cache_pb2.PutChunksHeader(**{**base, **kw}))


GOOD_META = dict(dtype="float16", shape=[2, 2], num_bytes=8)

BAD_PUTS = [
    ("header", [_piece(**GOOD_META)]),
    ("header", []),
    ("header.chunk_size", [_header(chunk_size=0)]),
    ("header.fingerprint", [_header(fingerprint="")]),
    ("header.token_ids", [_header(token_ids=[1, -2, 3, 4])]),
    ("header.start_chunk", [_header(start_chunk=3)]),
    ("piece.index", [_header(), _piece(index=2, **GOOD_META)]),
    ("piece.index", [_header(start_chunk=1), _piece(index=1, **GOOD_META)]),
    ("piece.meta", [_header(), _piece(dtype="object", shape=[2], num_bytes=16)]),
    ("piece.meta.num_bytes", [_header(), _piece(dtype="float16", shape=[2, 2], num_bytes=9)]),
    ("piece.offset", [_header(), _piece(offset=4, data=b"1234", **GOOD_META)]),
    ("piece.data", [_header(), _piece(data=b"123456789", **GOOD_META)]),
    ("piece", [_header(), _piece(data=b"1234", **GOOD_META)]),
    ("piece.meta.sha256", [_header(), _piece(data=b"12345678", sha256=b"x" * 32,
                                             **GOOD_META)]),
]


async def _expect_invalid(call, field: str):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(f"{field}:"), err.value.details()


async def test_bad_requests_name_the_field(cache):
    stub = cache.stub
    lookup = cache_pb2.LookupPrefixRequest
    await _expect_invalid(stub.LookupPrefix(lookup(fingerprint=FP, token_ids=[1], chunk_size=0)),
                          "chunk_size")
    await _expect_invalid(stub.LookupPrefix(lookup(token_ids=[1], chunk_size=4)), "fingerprint")
    await _expect_invalid(stub.LookupPrefix(lookup(fingerprint=FP, token_ids=[1, -1],
                                                   chunk_size=4)), "token_ids")
    pieces = stub.GetChunks(cache_pb2.GetChunksRequest(fingerprint=FP, chunk_keys=["nope"]))
    await _expect_invalid(pieces.read(), "chunk_keys[0]")
    for field, messages in BAD_PUTS:
        async def stream(messages=messages):
            for m in messages:
                yield m
        await _expect_invalid(stub.PutChunks(stream()), field)

    def result(**sampling):
        key = result_key(target_fingerprint=FP, prompt_token_ids=[1], max_new_tokens=4,
                         sampling=common_pb2.SamplingParams(**sampling))
        return cache_pb2.GetResultRequest(key=key)
    await _expect_invalid(stub.GetResult(result(temperature=-1)), "key.sampling.temperature")
    await _expect_invalid(stub.GetResult(result(temperature=0.5)), "key.sampling.seed")
    await _expect_invalid(stub.GetResult(result(top_p=0.0)), "key.sampling.top_p")
    await _expect_invalid(stub.GetResult(cache_pb2.GetResultRequest()), "key.target_fingerprint")
    await _expect_invalid(stub.PutResult(cache_pb2.PutResultRequest(
        key=result().key, token_ids=[-5])), "token_ids")

    # still serving everyone else
    tokens = list(range(8))
    assert await cache.client.put_chunks(FP, tokens, CHUNK, 0, _arrays(2)) == 2
    assert (await cache.client.lookup_prefix(FP, tokens, CHUNK)).num_tokens == 8
    assert (await cache.client.server_stats()).errors == 0


async def test_redis_killed_mid_run(cache):
    tokens = list(range(16))
    await cache.client.put_chunks(FP, tokens, CHUNK, 0, _arrays(4))
    hit = await cache.client.lookup_prefix(FP, tokens, CHUNK)
    assert hit.num_tokens == 16
    key = result_key(target_fingerprint=FP, prompt_token_ids=[1], max_new_tokens=2,
                     sampling=common_pb2.SamplingParams())
    assert await cache.client.put_result(key, [3], "length")

    cache.redis.stop()
    start = time.monotonic()
    assert await cache.client.lookup_prefix(FP, tokens, CHUNK) == PrefixHit(0, ())
    assert await cache.client.get_chunks(FP, hit.keys) == []
    assert await cache.client.put_chunks(FP, tokens, CHUNK, 0, _arrays(1)) == 0
    assert await cache.client.get_result(key) is None
    assert not await cache.client.put_result(key, [3], "length")
    assert time.monotonic() - start < 2.0  # misses, quickly
    stats = await cache.client.server_stats()
    assert stats.errors >= 1 and stats.prefix_misses >= 1 and stats.result_misses >= 1
    assert cache.client.stats.errors == 0  # the service answered every call

    # Redis back (empty): after retry_after_s the cache works again
    cache.redis.start()
    await asyncio.sleep(0.4)
    assert (await cache.client.lookup_prefix(FP, tokens, CHUNK)).num_tokens == 0
    assert await cache.client.put_chunks(FP, tokens, CHUNK, 0, _arrays(4)) == 4
    assert (await cache.client.lookup_prefix(FP, tokens, CHUNK)).num_tokens == 16


async def test_client_without_a_service():
    from tests.conftest import free_port

    client = CacheClient(f"127.0.0.1:{free_port()}", timeout_s=0.3, retry_after_s=5.0)
    start = time.monotonic()
    assert await client.lookup_prefix(FP, list(range(8)), CHUNK) == PrefixHit(0, ())
    assert await client.get_chunks(FP, ["0" * 64]) == []
    assert await client.put_chunks(FP, list(range(4)), CHUNK, 0, _arrays(1)) == 0
    key = result_key(target_fingerprint=FP, prompt_token_ids=[1], max_new_tokens=2,
                     sampling=common_pb2.SamplingParams())
    assert await client.get_result(key) is None
    assert await client.server_stats() is None
    assert time.monotonic() - start < 2.0
    assert client.stats.errors == 1 and client.stats.skipped == 4
    await client.close()


async def test_command_line_serves_and_exports_metrics(redis_server):
    import subprocess
    import sys
    import urllib.request

    from specmesh.wire.server import wait_for_serving
    from tests.conftest import free_port

    metrics_port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "specmesh.cache_service", "--redis-url", redis_server.url, "--port", "0",
         "--metrics-port", str(metrics_port), "--chunk-ttl-s", "60"],
        stdout=subprocess.PIPE, text=True)
    try:
        first = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)
        assert first.strip() == f"metrics on http://127.0.0.1:{metrics_port}/metrics"
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)
        assert " listening on 127.0.0.1:" in line
        address = line.split()[-1]
        await wait_for_serving(address, 30)
        async with CacheClient(address) as client:
            tokens = list(range(8))
            assert await client.put_chunks(FP, tokens, CHUNK, 0, _arrays(2)) == 2
            assert (await client.lookup_prefix(FP, tokens, CHUNK)).num_tokens == 8
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        text = (await asyncio.to_thread(lambda: urllib.request.urlopen(url).read())).decode()
        assert 'specmesh_cache_hits_total{kind="prefix",service="cache"} 1.0' in text
        assert 'specmesh_cache_chunks_total{outcome="written",service="cache"} 2.0' in text
        assert 'method="CacheService/PutChunks"' in text  # RPC metrics, as every service
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0



async def test_long_lookups_are_bounded_and_hashed_off_the_loop(cache):
    from specmesh.cache_service.engine import MAX_TOKENS

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await cache.stub.LookupPrefix(cache_pb2.LookupPrefixRequest(
            fingerprint="f" * 32, token_ids=[1] * (MAX_TOKENS + 1), chunk_size=16))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "token_ids" in info.value.details()
    # a long legal lookup is hashed on a worker thread, a short one on the loop's thread
    import threading

    from specmesh.cache_service import engine as engine_module

    threads = []
    real = engine_module.keys.chunk_keys

    def spy(*args):
        threads.append(threading.get_ident())
        return real(*args)
    engine_module.keys.chunk_keys = spy
    try:
        long = await cache.stub.LookupPrefix(cache_pb2.LookupPrefixRequest(
            fingerprint="f" * 32, token_ids=[1] * MAX_TOKENS, chunk_size=16))
        short = await cache.stub.LookupPrefix(cache_pb2.LookupPrefixRequest(
            fingerprint="f" * 32, token_ids=[1] * 64, chunk_size=16))
    finally:
        engine_module.keys.chunk_keys = real
    assert long.num_tokens == 0 and short.num_tokens == 0
    assert threads[0] != threading.get_ident() and threads[1] == threading.get_ident()
