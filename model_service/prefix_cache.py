"""Prefix KV through the cache service, the async side shared by the draft and verify services.

The servicer asks the cache for a new sequence's longest cached prefix before the item goes to
the engine, and after the prefill stores the prompt's new full chunks in a background task, off
the token path. The torch side (writing and reading the KV) is `model_service.prefix_kv`; here
there is no torch, only the numpy chunk arrays and a callable that exports them on the engine
thread.

    prefix = PrefixCache(CacheClient(addr), loaded.fingerprint, 16, export)
    result = await prefix.submit(worker.submit, item)   # instead of worker.submit(item)

which is `load` (the item's engine then seeds the sequence with the chunks: see
`model_service.prefix_kv.seed_prefix`), the engine call, then `store_later`.

Cache trouble never fails a generation: `CacheClient` answers misses, and a store that fails is
only logged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import numpy as np

from specmesh.wire.cache_client import CacheClient
from specmesh.wire.metrics import ServiceMetrics
from specmesh.wire.security import Security

log = logging.getLogger(__name__)
R = TypeVar("R")

# (seq_id, token_ids, chunk_size, start_chunk, end_chunk) -> one array per chunk, or [] when the
# sequence no longer holds those tokens; runs on the engine thread (see `DynamicBatcher.call`)
ExportChunks = Callable[[str, list[int], int, int, int], Awaitable[list[np.ndarray]]]


@dataclass
class PrefixStats:
    lookups: int = 0  # new sequences with at least one full chunk
    hits: int = 0  # of those, with at least one chunk loaded
    tokens_loaded: int = 0
    load_s: float = 0.0  # time spent in lookups and transfers
    chunks_stored: int = 0
    stores_skipped: int = 0  # the sequence changed before its export, or a twin was in flight
    store_errors: int = 0

    @property
    def misses(self) -> int:
        return self.lookups - self.hits


class PrefixCache:
    """Loads and stores one model's prefix-KV chunks (keys salted with its `fingerprint`)."""

    def __init__(self, client: CacheClient, fingerprint: str, chunk_size: int,
                 export: ExportChunks, metrics: ServiceMetrics | None = None):
        if chunk_size <= 0:
            raise ValueError(f"chunk_size {chunk_size} must be positive")
        self.client = client
        self.fingerprint = fingerprint
        self.chunk_size = chunk_size
        self.stats = PrefixStats()
        self.metrics = metrics  # counts each lookup as specmesh_cache_requests{kind="prefix"}
        self._export = export
        self._tasks: set[asyncio.Task] = set()
        self._in_flight: set[tuple[int, int]] = set()  # (num_tokens, hash) of prefixes storing

    async def submit(self, submit: Callable[[Any], Awaitable[R]], item: Any) -> R:
        """`submit(item)` with the cached prefix of a new sequence attached, then the store of
        its new full chunks scheduled. `item`: a frozen dataclass with `seq_id`,
        `num_cached_tokens`, `new_tokens` and `prefix_chunks` (VerifyItem, ProposeItem)."""
        chunks = await self.load(item.num_cached_tokens, item.new_tokens)
        result = await submit(replace(item, prefix_chunks=chunks) if chunks else item)
        self.store_later(item.seq_id, item.num_cached_tokens, item.new_tokens, len(chunks))
        return result

    async def load(self, num_cached_tokens: int,
                   token_ids: Sequence[int]) -> tuple[np.ndarray, ...]:
        """The cached leading chunks of a new sequence (`num_cached_tokens == 0`), else ()."""
        if num_cached_tokens != 0 or len(token_ids) < self.chunk_size:
            return ()
        start = time.perf_counter()
        arrays = await self.client.load_prefix(self.fingerprint, token_ids, self.chunk_size)
        elapsed = time.perf_counter() - start
        s = self.stats
        s.lookups += 1
        s.load_s += elapsed
        if arrays:
            s.hits += 1
            s.tokens_loaded += len(arrays) * self.chunk_size
        if self.metrics is not None:
            self.metrics.observe_cache("prefix", bool(arrays))
        log.debug("prefix %s: %d of %d tokens cached (%.1f ms); %d hits / %d lookups",
                  "hit" if arrays else "miss", len(arrays) * self.chunk_size, len(token_ids),
                  1e3 * elapsed, s.hits, s.lookups)
        return tuple(arrays)

    def store_later(self, seq_id: str, num_cached_tokens: int, token_ids: Sequence[int],
                    num_loaded_chunks: int) -> asyncio.Task | None:
        """After a new sequence's prefill: store its full chunks past the `num_loaded_chunks`
        that came from the cache, in a background task. Returns the task (None: nothing to do)."""
        end_chunk = len(token_ids) // self.chunk_size
        if num_cached_tokens != 0 or end_chunk <= num_loaded_chunks:
            return None
        tokens = [int(t) for t in token_ids[:end_chunk * self.chunk_size]]
        twin = (len(tokens), hash(tuple(tokens)))
        if twin in self._in_flight:
            self.stats.stores_skipped += 1
            return None
        self._in_flight.add(twin)
        task = asyncio.get_running_loop().create_task(
            self._store(seq_id, tokens, num_loaded_chunks, end_chunk))
        self._tasks.add(task)
        task.add_done_callback(lambda t: (self._tasks.discard(t), self._in_flight.discard(twin)))
        return task

    async def _store(self, seq_id: str, tokens: list[int], start_chunk: int,
                     end_chunk: int) -> None:
        try:
            arrays = await self._export(seq_id, tokens, self.chunk_size, start_chunk, end_chunk)
            if not arrays:
                self.stats.stores_skipped += 1
                return
            stored = await self.client.put_chunks(self.fingerprint, tokens, self.chunk_size,
                                                  start_chunk, arrays)
            self.stats.chunks_stored += stored
        except Exception as exc:  # noqa: BLE001 - a failed store only costs a future hit
            self.stats.store_errors += 1
            log.warning("prefix store for %s failed: %s: %s", seq_id, type(exc).__name__, exc)

    async def drain(self) -> None:
        """Wait for the stores in flight (tests and graceful shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)
        s = self.stats
        log.info("prefix cache: %d hits / %d lookups, %d tokens loaded, %d chunks stored",
                 s.hits, s.lookups, s.tokens_loaded, s.chunks_stored)
        await self.client.close()


def make_prefix_cache(cache_addr: str | None, fingerprint: str, chunk_size: int,
                      export: ExportChunks,
                      metrics: ServiceMetrics | None = None,
                      security: Security | None = None) -> PrefixCache | None:
    """A PrefixCache for a service configured with `cache_addr`; None when it has none."""
    if not cache_addr:
        return None
    return PrefixCache(CacheClient(cache_addr, security=security), fingerprint, chunk_size,
                       export, metrics)
