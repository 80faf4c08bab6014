"""CacheEngine without sockets: size caps, slow Redis, back-off, metrics (fakeredis, stubs)."""

from __future__ import annotations

import asyncio

import fakeredis
import numpy as np
from prometheus_client import CollectorRegistry, generate_latest

from specmesh.cache_service import codec
from specmesh.cache_service.codec import CachedResult
from specmesh.cache_service.config import CacheServiceConfig
from specmesh.cache_service.engine import CacheEngine
from specmesh.cache_service.keys import ResultKeyFields
from specmesh.cache_service.stats import StatsCollector
from specmesh.cache_service.store import RedisStore

FP = "fp"
CONFIG = CacheServiceConfig(max_chunk_bytes=4096, max_result_bytes=64, redis_timeout_s=0.05,
                            retry_after_s=10.0)


def _engine(config=CONFIG, clock=None) -> CacheEngine:
    store = RedisStore(fakeredis.FakeAsyncRedis())
    return CacheEngine(store, config, **({"clock": clock} if clock else {}))


def _chunk(n: int) -> codec.ChunkData:
    arr = np.arange(n, dtype=np.float32)
    return codec.make_chunk("float32", arr.shape, arr.tobytes())


def _fields(**kw) -> ResultKeyFields:
    base = dict(draft_fingerprint="", target_fingerprint=FP, prompt_token_ids=(1, 2),
                temperature=0.0, top_p=1.0, top_k=0, seed=None, max_new_tokens=4)
    return ResultKeyFields(**{**base, **kw})


async def test_chunk_round_trip_and_size_cap():
    engine = _engine()
    keys = engine.chunk_keys(FP, list(range(8)), 4)
    assert await engine.put_chunk(FP, keys[0], _chunk(16))
    assert not await engine.put_chunk(FP, keys[1], _chunk(2000))  # 8000 bytes > 4096
    assert (await engine.lookup_prefix(FP, list(range(8)), 4)).keys == keys[:1]
    got = [c async for c in engine.get_chunks(FP, keys)]
    assert got == [_chunk(16)]
    assert engine.stats.chunks_skipped == 1 and engine.stats.chunks_written == 1
    assert engine.stats.rejected_by_reason == {"missing": 1}


async def test_result_size_cap():
    engine = _engine()
    assert await engine.put_result(_fields(), CachedResult((1, 2, 3), "eos"))
    assert not await engine.put_result(_fields(max_new_tokens=99),
                                       CachedResult(tuple(range(50)), "length"))
    assert engine.stats.results_skipped == 1
    assert await engine.get_result(_fields()) == CachedResult((1, 2, 3), "eos")
    assert await engine.get_result(_fields(max_new_tokens=99)) is None


class SlowStore:
    """A store whose every call hangs longer than the engine's timeout."""

    def __init__(self):
        self.calls = 0

    async def _hang(self, *args, **kwargs):
        self.calls += 1
        await asyncio.sleep(5)

    has_chunks = get_chunks = put_chunk = get_result = put_result = _hang

    async def close(self):
        pass


async def test_slow_redis_is_a_miss_then_backs_off():
    now = [100.0]
    store = SlowStore()
    engine = CacheEngine(store, CONFIG, clock=lambda: now[0])
    tokens = list(range(8))
    assert (await asyncio.wait_for(engine.lookup_prefix(FP, tokens, 4), 1)).num_tokens == 0
    assert engine.stats.errors == 1 and store.calls == 1
    # backing off: answered without touching Redis
    assert (await engine.lookup_prefix(FP, tokens, 4)).num_tokens == 0
    assert await engine.get_result(_fields()) is None
    assert [c async for c in engine.get_chunks(FP, ["0" * 64])] == []
    assert not await engine.put_chunk(FP, "0" * 64, _chunk(4))
    assert store.calls == 1 and engine.stats.errors == 1
    now[0] += 11  # retry_after_s passed: tries again
    await asyncio.wait_for(engine.get_result(_fields()), 1)
    assert store.calls == 2 and engine.stats.errors == 2
    assert engine.stats.prefix_misses == 2 and engine.stats.result_misses == 2


def test_prometheus_view():
    engine = _engine()
    engine.stats.prefix_hits = 3
    engine.stats.errors = 2
    engine.stats.reject("checksum")
    engine.stats.observe("lookup_prefix", 0.002)
    registry = CollectorRegistry()
    registry.register(StatsCollector(engine.stats))
    text = generate_latest(registry).decode()
    assert 'specmesh_cache_hits_total{kind="prefix",service="cache"} 3.0' in text
    assert 'specmesh_cache_errors_total{service="cache"} 2.0' in text
    assert 'specmesh_cache_chunks_rejected_total{reason="checksum",service="cache"} 1.0' in text
    assert 'specmesh_cache_request_seconds_bucket{le="0.0025",op="lookup_prefix",service="cache"} 1.0' in text
    assert 'specmesh_cache_request_seconds_count{op="lookup_prefix",service="cache"} 1.0' in text
