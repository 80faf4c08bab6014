"""The fleet n-gram table: pure counting and checks, then PutNgrams/GetNgrams through a real
gRPC server over a real redis-server (bounds, TTL, model separation, bad input)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import grpc
import msgpack
import pytest
import redis.asyncio as aioredis

from specmesh.cache_service.__main__ import start_server
from specmesh.cache_service.config import CacheServiceConfig
from specmesh.cache_service.keys import ngram_key
from specmesh.cache_service.ngrams import (
    MAX_GET_CONTEXTS,
    check_put,
    decode_continuation,
    encode_continuation,
    ngram_pairs,
)
from specmesh.cache_service.store import ngram_store_key
from specmesh.v1 import cache_pb2, cache_pb2_grpc
from specmesh.wire.cache_client import CacheClient
from specmesh.wire.errors import InvalidRequest
from specmesh.wire.server import CHANNEL_OPTIONS

FP = "target-fp"


def test_pairs_count_each_continuation_after_each_context_length():
    put = check_put([5, 6, 7, 5, 6, 8], first=2, end=0, min_n=1, max_n=2, max_depth=2)
    assert ngram_pairs(put) == {
        (6,): {(7, 5), (8,)}, (5, 6): {(7, 5), (8,)}, (7,): {(5, 6)}, (6, 7): {(5, 6)},
        (5,): {(6, 8)}, (7, 5): {(6, 8)}}
    # end_position stops the starts, not the continuations; contexts never reach before 0
    put = check_put([1, 2, 3, 4], first=0, end=2, min_n=1, max_n=3, max_depth=3)
    assert ngram_pairs(put) == {(1,): {(2, 3, 4)}}


def test_a_repeat_inside_one_request_counts_once():
    put = check_put([9, 1, 9, 1, 9, 1], first=1, end=0, min_n=1, max_n=1, max_depth=1)
    assert ngram_pairs(put) == {(9,): {(1,)}, (1,): {(9,)}}


def test_continuations_are_msgpack_lists_and_garbage_reads_as_none():
    blob = encode_continuation([3, 0, 70000])
    assert msgpack.unpackb(blob) == [3, 0, 70000]
    assert decode_continuation(blob) == (3, 0, 70000)
    for bad in (b"\xc1", msgpack.packb({"a": 1}), msgpack.packb([]), msgpack.packb([-1]),
                msgpack.packb(["x"]), msgpack.packb(list(range(17))), msgpack.packb([True])):
        assert decode_continuation(bad) is None, bad


@pytest.mark.parametrize("kwargs, field", [
    (dict(min_n=0), "min_n"), (dict(min_n=3, max_n=2), "min_n"), (dict(max_n=9), "max_n"),
    (dict(max_depth=0), "max_depth"), (dict(max_depth=17), "max_depth"),
    (dict(end=9), "end_position"), (dict(first=5, end=4), "first_position"),
    (dict(tokens=[1, -2, 3]), "token_ids"), (dict(tokens=[1] * 9000), "token_ids"),
])
def test_bad_puts_name_their_field(kwargs, field):
    args = dict(tokens=[1, 2, 3, 4, 5], first=0, end=0, min_n=1, max_n=2, max_depth=4)
    args.update(kwargs)
    with pytest.raises(InvalidRequest) as info:
        check_put(args.pop("tokens"), **args)
    assert info.value.field == field


def test_keys_are_salted_with_the_table_key():
    assert ngram_key("a", [1, 2]) != ngram_key("b", [1, 2])
    assert ngram_key("a", [1, 2]) != ngram_key("a", [2])
    assert ngram_key("a", [1, 2]) == ngram_key("a", (1, 2))


@pytest.fixture
async def cache(redis_server):
    config = CacheServiceConfig(redis_url=redis_server.url, ngram_ttl_s=2,
                                ngram_max_continuations=3)
    server, servicer = await start_server(config)
    address = f"127.0.0.1:{server.port}"
    channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
    client = CacheClient(address, timeout_s=5.0)
    redis = aioredis.from_url(redis_server.url)
    yield SimpleNamespace(client=client, stub=cache_pb2_grpc.CacheServiceStub(channel),
                          engine=servicer.engine, redis=redis)
    await redis.aclose()
    await client.close()
    await channel.close()
    await server.stop(0.1)
    await servicer.close()


@pytest.mark.redis
async def test_put_then_get_counts_requests_most_counted_first(cache):
    c = cache.client
    assert await c.get_ngrams(FP, [[5, 6]]) == [[]]
    assert await c.put_ngrams(FP, [5, 6, 7, 8], first=2, min_n=1, max_n=2, max_depth=2) == 4
    assert await c.put_ngrams(FP, [4, 5, 6, 7, 9], first=3, min_n=2, max_n=2, max_depth=2) == 2
    got = await c.get_ngrams(FP, [[5, 6], [6], [6, 7], [1, 2]])
    assert [set(entry) for entry in got] == [{((7, 8), 1), ((7, 9), 1)}, {((7, 8), 1)},
                                             {((8,), 1), ((9,), 1)}, set()]
    await c.put_ngrams(FP, [6, 7, 9, 9], first=2, min_n=2, max_n=2, max_depth=1)
    assert await c.get_ngrams(FP, [[6, 7]]) == [[((9,), 2), ((8,), 1)]]
    assert await c.get_ngrams(FP, [[6, 7]], max_continuations=1) == [[((9,), 2)]]
    stats = await c.server_stats()
    assert (stats.ngrams_written, stats.ngram_lookups, stats.ngram_hits) == (8, 7, 5)


@pytest.mark.redis
async def test_a_context_keeps_a_bounded_top_and_newcomers_replace_the_least_counted(cache):
    c = cache.client
    for rep, cont in ((3, 10), (2, 11), (1, 12)):  # cap 3: counts 3, 2, 1
        for _ in range(rep):
            await c.put_ngrams(FP, [1, 2, cont], first=2, min_n=2, max_n=2, max_depth=1)
    await c.put_ngrams(FP, [1, 2, 13], first=2, min_n=2, max_n=2, max_depth=1)
    (entry,) = await c.get_ngrams(FP, [[1, 2]])
    assert entry == [((10,), 3), ((13,), 2), ((11,), 2)] or \
        entry == [((10,), 3), ((11,), 2), ((13,), 2)]
    assert await cache.redis.zcard(ngram_store_key(ngram_key(FP, [1, 2]))) == 3


@pytest.mark.redis
async def test_entries_expire_after_their_ttl(cache):
    await cache.client.put_ngrams(FP, [1, 2, 3], first=2, min_n=2, max_n=2, max_depth=1)
    ttl = await cache.redis.pttl(ngram_store_key(ngram_key(FP, [1, 2])))
    assert 0 < ttl <= 2000
    await asyncio.sleep(2.2)
    assert await cache.client.get_ngrams(FP, [[1, 2]]) == [[]]


@pytest.mark.redis
async def test_tables_of_two_models_never_mix(cache):
    await cache.client.put_ngrams("model-a", [1, 2, 3], first=2, min_n=2, max_n=2, max_depth=1)
    assert await cache.client.get_ngrams("model-b", [[1, 2]]) == [[]]
    assert await cache.client.get_ngrams("model-a", [[1, 2]]) == [[((3,), 1)]]


@pytest.mark.redis
async def test_corrupt_members_are_skipped(cache):
    await cache.client.put_ngrams(FP, [1, 2, 3], first=2, min_n=2, max_n=2, max_depth=1)
    await cache.redis.zadd(ngram_store_key(ngram_key(FP, [1, 2])), {b"\xc1junk": 9})
    assert await cache.client.get_ngrams(FP, [[1, 2]]) == [[((3,), 1)]]


def _ctx(*tokens):
    return cache_pb2.NgramContext(token_ids=tokens)


@pytest.mark.redis
@pytest.mark.parametrize("request_, field", [
    (cache_pb2.PutNgramsRequest(token_ids=[1, 2], min_n=1, max_n=1, max_depth=1),
     "fingerprint"),
    (cache_pb2.PutNgramsRequest(fingerprint=FP, token_ids=[1, 2], max_n=1, max_depth=1),
     "min_n"),
    (cache_pb2.PutNgramsRequest(fingerprint=FP, token_ids=[1] * 5000, min_n=1, max_n=2,
                                max_depth=1), "token_ids"),
    (cache_pb2.GetNgramsRequest(contexts=[_ctx(1)]), "fingerprint"),
    (cache_pb2.GetNgramsRequest(fingerprint=FP, contexts=[_ctx(1), _ctx()]),
     "contexts[1].token_ids"),
    (cache_pb2.GetNgramsRequest(fingerprint=FP, contexts=[_ctx(*range(9))]),
     "contexts[0].token_ids"),
    (cache_pb2.GetNgramsRequest(fingerprint=FP, contexts=[_ctx(1)] * (MAX_GET_CONTEXTS + 1)),
     "contexts"),
    (cache_pb2.GetNgramsRequest(fingerprint=FP, contexts=[_ctx(1)], max_continuations=-1),
     "max_continuations"),
])
async def test_bad_requests_are_invalid_argument_naming_the_field(cache, request_, field):
    call = cache.stub.PutNgrams if isinstance(request_, cache_pb2.PutNgramsRequest) \
        else cache.stub.GetNgrams
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(request_, timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in info.value.details()
    # and the client answers a miss, never raises
    assert await cache.client.get_ngrams("", [[1]]) is None


@pytest.mark.redis
async def test_redis_down_is_a_miss(cache, redis_server):
    redis_server.stop()
    assert await cache.client.put_ngrams(FP, [1, 2, 3], first=2, max_depth=1) == 0
    assert await cache.client.get_ngrams(FP, [[1, 2]]) == [[]]
