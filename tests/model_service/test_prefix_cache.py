"""PrefixCache (the async side of prefix KV) against a fake CacheClient: what it loads, what and
when it stores, and that no failure escapes."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np

from specmesh.model_service.prefix_cache import PrefixCache, make_prefix_cache
from specmesh.wire.metrics import ServiceMetrics

CHUNK = 4


class FakeClient:
    def __init__(self, cached_chunks: int = 0):
        self.cached_chunks = cached_chunks
        self.puts: list[tuple[int, int]] = []  # (start_chunk, num_arrays)
        self.closed = False

    async def load_prefix(self, fingerprint, token_ids, chunk_size):
        n = min(self.cached_chunks, len(token_ids) // chunk_size)
        return [np.full((1, 2, chunk_size, 1, 1), i, np.float32) for i in range(n)]

    async def put_chunks(self, fingerprint, token_ids, chunk_size, start_chunk, arrays):
        assert len(token_ids) == (start_chunk + len(arrays)) * chunk_size
        self.puts.append((start_chunk, len(arrays)))
        return len(arrays)

    async def close(self):
        self.closed = True


@dataclass(frozen=True)
class Item:
    seq_id: str
    num_cached_tokens: int
    new_tokens: list[int]
    prefix_chunks: tuple = ()


def make(client, export=None, gate: asyncio.Event | None = None,
         metrics: ServiceMetrics | None = None) -> tuple[PrefixCache, list]:
    calls = []

    async def default_export(seq_id, tokens, chunk_size, start, end):
        calls.append((seq_id, start, end))
        if gate is not None:
            await gate.wait()
        return [np.zeros((1, 2, chunk_size, 1, 1), np.float32)] * (end - start)

    return PrefixCache(client, "fp", CHUNK, export or default_export, metrics), calls


async def test_new_sequence_loads_then_stores_the_rest():
    client = FakeClient(cached_chunks=2)
    metrics = ServiceMetrics("verify")
    prefix, exports = make(client, metrics=metrics)
    seen = []

    async def submit(item):
        seen.append(item)
        return "ok"

    assert await prefix.submit(submit, Item("s", 0, list(range(18)))) == "ok"
    assert len(seen[0].prefix_chunks) == 2
    await prefix.drain()
    assert exports == [("s", 2, 4)] and client.puts == [(2, 2)]
    s = prefix.stats
    assert (s.lookups, s.hits, s.misses, s.tokens_loaded, s.chunks_stored) == (1, 1, 0, 8, 2)
    await prefix.load(0, [7] * 8)  # the fake has 2 chunks for everything: a second hit
    client.cached_chunks = 0
    await prefix.load(0, [7] * 8)
    for result, count in (("hit", 2), ("miss", 1)):
        assert metrics.registry.get_sample_value("specmesh_cache_requests_total", {
            "service": "verify", "kind": "prefix", "result": result}) == count


async def test_running_or_short_sequences_never_touch_the_cache():
    client = FakeClient(cached_chunks=5)
    prefix, exports = make(client)
    assert await prefix.load(3, list(range(20))) == ()  # not a new sequence
    assert await prefix.load(0, [1, 2, 3]) == ()  # shorter than a chunk
    assert prefix.store_later("s", 3, list(range(20)), 0) is None
    assert prefix.store_later("s", 0, list(range(20)), 5) is None  # all were cached
    assert prefix.stats.lookups == 0 and exports == []


async def test_twin_stores_in_flight_are_skipped():
    gate = asyncio.Event()
    client = FakeClient()
    prefix, exports = make(client, gate=gate)
    first = prefix.store_later("a", 0, list(range(9)), 0)
    assert prefix.store_later("b", 0, list(range(8)) + [99], 0) is None  # same 2 chunks
    assert prefix.store_later("c", 0, list(range(1, 9)), 0) is not None  # other tokens
    gate.set()
    await prefix.drain()
    assert first.done() and len(client.puts) == 2 and prefix.stats.stores_skipped == 1
    assert prefix.store_later("d", 0, list(range(8)), 0) is not None  # no longer in flight
    await prefix.close()
    assert client.closed


async def test_export_trouble_is_counted_never_raised():
    async def gone(*args):
        return []

    async def broken(*args):
        raise RuntimeError("engine stopped")

    client = FakeClient()
    for export, field in ((gone, "stores_skipped"), (broken, "store_errors")):
        prefix, _ = make(client, export)
        await prefix.store_later("s", 0, list(range(8)), 0)
        assert getattr(prefix.stats, field) == 1 and prefix.stats.chunks_stored == 0
    assert client.puts == []


def test_no_address_means_no_prefix_cache():
    assert make_prefix_cache(None, "fp", 16, None) is None
