"""The cache logic (no gRPC): validate, key, encode, store, count.

Cache trouble is never an error to the caller: a Redis failure or timeout is counted, logged and
answered as a miss (and for `retry_after_s` after a connection failure Redis is not even tried);
a missing, corrupt or foreign entry is counted as rejected and read as a miss. Only malformed
requests raise (`InvalidRequest`, naming the request field).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from specmesh.cache_service import codec, keys, ngrams
from specmesh.cache_service.codec import CachedResult, ChunkData, RejectedEntry
from specmesh.cache_service.config import CacheServiceConfig
from specmesh.cache_service.keys import ResultKeyFields
from specmesh.cache_service.stats import CacheStats
from specmesh.cache_service.store import RedisStore
from specmesh.wire.errors import InvalidRequest

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_FINGERPRINT_CHARS = 256
MAX_TOKENS = 1 << 17  # per key; hashing is linear in tokens (1M tokens took 10 s)
OFF_LOOP_TOKENS = 4096  # key chains longer than this are hashed off the event loop
MAX_CHUNK_SIZE = 1 << 16
MAX_KEYS = 1 << 16
MAX_TOKEN_ID = (1 << 31) - 1
OFF_LOOP_NGRAMS = 1024  # PutNgrams with more pairs than this are counted off the event loop
GET_BATCH = 8  # chunk payloads fetched per Redis round trip
_UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError, asyncio.TimeoutError)


@dataclass(frozen=True)
class PrefixLookup:
    """The cached leading chunks of a sequence."""

    num_tokens: int  # len(keys) * chunk_size
    keys: list[str]  # hex keys of the cached leading chunks, in order


class CacheEngine:
    """Prefix-KV chunks and results over one RedisStore, with stats."""

    def __init__(self, store: RedisStore, config: CacheServiceConfig,
                 stats: CacheStats | None = None, clock: Callable[[], float] = time.monotonic):
        self.store = store
        self.config = config
        self.stats = stats if stats is not None else CacheStats()
        self._clock = clock
        self._down_until = float("-inf")

    # -- prefix KV ------------------------------------------------------------------------------
    def chunk_keys(self, fingerprint: str, token_ids: Sequence[int], chunk_size: int,
                   where: str = "") -> list[str]:
        """Validated `keys.chunk_keys`; `where` prefixes the field names in errors."""
        _check_fingerprint(fingerprint, f"{where}fingerprint")
        _check_tokens(token_ids, f"{where}token_ids")
        if not 0 < chunk_size <= MAX_CHUNK_SIZE:
            raise InvalidRequest(f"{where}chunk_size", f"{chunk_size} not in [1, {MAX_CHUNK_SIZE}]")
        return keys.chunk_keys(fingerprint, token_ids, chunk_size)

    async def chunk_keys_async(self, fingerprint: str, token_ids: Sequence[int],
                               chunk_size: int, where: str = "") -> list[str]:
        """`chunk_keys`, hashed on a worker thread when long, so other calls keep flowing."""
        if len(token_ids) <= OFF_LOOP_TOKENS:
            return self.chunk_keys(fingerprint, token_ids, chunk_size, where)
        return await asyncio.to_thread(self.chunk_keys, fingerprint, token_ids, chunk_size,
                                       where)

    async def lookup_prefix(self, fingerprint: str, token_ids: Sequence[int],
                            chunk_size: int) -> PrefixLookup:
        """Longest run of leading chunks whose markers exist."""
        all_keys = await self.chunk_keys_async(fingerprint, token_ids, chunk_size)
        start = self._clock()
        present = await self._redis("lookup_prefix", lambda: self.store.has_chunks(all_keys), [])
        num_chunks = next((i for i, ok in enumerate(present) if not ok), len(present))
        self.stats.observe("lookup_prefix", self._clock() - start)
        if num_chunks:
            self.stats.prefix_hits += 1
            self.stats.prefix_tokens_hit += num_chunks * chunk_size
        else:
            self.stats.prefix_misses += 1
        return PrefixLookup(num_chunks * chunk_size, all_keys[:num_chunks])

    async def get_chunks(self, fingerprint: str, chunk_keys: Sequence[str]
                         ) -> AsyncIterator[ChunkData]:
        """Yield the chunks of `chunk_keys` in order; stop at the first missing or rejected one."""
        _check_fingerprint(fingerprint, "fingerprint")
        _check_keys(chunk_keys, "chunk_keys")
        start = self._clock()
        try:
            for first in range(0, len(chunk_keys), GET_BATCH):
                batch = list(chunk_keys[first:first + GET_BATCH])
                blobs = await self._redis("get_chunks", lambda: self.store.get_chunks(batch), None)
                if blobs is None:  # Redis trouble, already counted
                    return
                for blob in blobs:
                    chunk = self._decode(blob, fingerprint)
                    if chunk is None:
                        return
                    self.stats.chunks_read += 1
                    self.stats.bytes_read += chunk.num_bytes
                    yield chunk
        finally:
            self.stats.observe("get_chunks", self._clock() - start)

    def chunk_fits(self, num_bytes: int) -> bool:
        """Whether a chunk of `num_bytes` is under the size cap (else it is skipped)."""
        return num_bytes <= self.config.max_chunk_bytes

    def skip_chunk(self) -> None:
        """Count a chunk not stored because it is over the size cap (its bytes were dropped)."""
        self.stats.chunks_skipped += 1

    async def put_chunk(self, fingerprint: str, key: str, chunk: ChunkData) -> bool:
        """Store one chunk (payload, then marker). False if over the cap or Redis failed."""
        if not self.chunk_fits(chunk.num_bytes):
            self.skip_chunk()
            return False
        payload = codec.encode_chunk(fingerprint, chunk)
        start = self._clock()
        ok = await self._redis("put_chunk", lambda: self._put(key, payload), False)
        self.stats.observe("put_chunk", self._clock() - start)
        if ok:
            self.stats.chunks_written += 1
            self.stats.bytes_written += len(payload)
        return ok

    async def _put(self, key: str, payload: bytes) -> bool:
        await self.store.put_chunk(key, payload, self.config.chunk_ttl_s)
        return True

    def _decode(self, blob: bytes | None, fingerprint: str) -> ChunkData | None:
        if blob is None:
            self.stats.reject("missing")
            return None
        try:
            return codec.decode_chunk(blob, fingerprint)
        except RejectedEntry as exc:
            self.stats.reject(exc.reason)
            log.warning("ignoring a stored chunk: %s", exc)
            return None

    # -- results --------------------------------------------------------------------------------
    async def get_result(self, fields: ResultKeyFields) -> CachedResult | None:
        key = keys.result_key(_check_result_key(fields))
        start = self._clock()
        blob = await self._redis("get_result", lambda: self.store.get_result(key), None)
        result = None
        if blob is not None:
            try:
                result = codec.decode_result(blob)
            except RejectedEntry as exc:
                log.warning("ignoring a stored result: %s", exc)
        self.stats.observe("get_result", self._clock() - start)
        if result is None:
            self.stats.result_misses += 1
        else:
            self.stats.result_hits += 1
            self.stats.bytes_read += len(blob)
        return result

    async def put_result(self, fields: ResultKeyFields, result: CachedResult) -> bool:
        """Store a finished generation. False if over the size cap or Redis failed."""
        key = keys.result_key(_check_result_key(fields))
        _check_tokens(result.token_ids, "token_ids")
        value = codec.encode_result(result)
        if len(value) > self.config.max_result_bytes:
            self.stats.results_skipped += 1
            return False
        start = self._clock()
        ok = await self._redis("put_result", lambda: self._put_result(key, value), False)
        self.stats.observe("put_result", self._clock() - start)
        if ok:
            self.stats.results_written += 1
            self.stats.bytes_written += len(value)
        return ok

    async def _put_result(self, key: str, value: bytes) -> bool:
        await self.store.put_result(key, value, self.config.result_ttl_s)
        return True

    # -- fleet n-gram table ---------------------------------------------------------------------
    async def put_ngrams(self, fingerprint: str, put: ngrams.NgramPut) -> int:
        """Count the (context, continuation) pairs of a checked stretch; the pairs counted (0
        if Redis failed)."""
        _check_fingerprint(fingerprint, "fingerprint")
        if (put.end - put.first) * (put.max_n - put.min_n + 1) <= OFF_LOOP_NGRAMS:
            entries = _ngram_entries(fingerprint, put)
        else:
            entries = await asyncio.to_thread(_ngram_entries, fingerprint, put)
        num = sum(len(members) for members in entries.values())
        start = self._clock()
        ok = await self._redis("put_ngrams", lambda: self._put_ngrams(entries), False)
        self.stats.observe("put_ngrams", self._clock() - start)
        if not ok:
            return 0
        self.stats.ngrams_written += num
        return num

    async def _put_ngrams(self, entries: dict[str, list[bytes]]) -> bool:
        await self.store.put_ngrams(entries, self.config.ngram_max_continuations,
                                    self.config.ngram_ttl_s)
        return True

    async def get_ngrams(self, fingerprint: str, contexts: Sequence[Sequence[int]], top: int
                         ) -> list[list[tuple[tuple[int, ...], int]]]:
        """Per context, its most counted (continuation, count) pairs (at most `top`, 0 = the
        configured cap); empty lists on a miss or Redis trouble."""
        _check_fingerprint(fingerprint, "fingerprint")
        top = ngrams.check_contexts(contexts, top, self.config.ngram_max_continuations)
        names = [keys.ngram_key(fingerprint, ctx) for ctx in contexts]
        start = self._clock()
        rows = await self._redis("get_ngrams", lambda: self.store.get_ngrams(names, top), None)
        self.stats.observe("get_ngrams", self._clock() - start)
        out: list[list[tuple[tuple[int, ...], int]]] = []
        for row in rows or [[] for _ in names]:
            conts = [(ngrams.decode_continuation(m), int(score)) for m, score in row]
            out.append([(c, n) for c, n in conts if c is not None and n > 0])
        self.stats.ngram_lookups += len(names)
        self.stats.ngram_hits += sum(bool(entry) for entry in out)
        return out

    # -- Redis calls ----------------------------------------------------------------------------
    async def _redis(self, op: str, call: Callable[[], Awaitable[T]], miss: T) -> T:
        """Run one store call under the timeout; on any Redis trouble count, log, return `miss`."""
        now = self._clock()
        if now < self._down_until:
            return miss
        try:
            return await asyncio.wait_for(call(), 2 * self.config.redis_timeout_s)
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            self.stats.errors += 1
            if isinstance(exc, _UNREACHABLE):
                self._down_until = now + self.config.retry_after_s
            log.warning("redis %s failed (%s: %s); answering a miss", op, type(exc).__name__, exc)
            return miss

    async def close(self) -> None:
        try:
            await self.store.close()
        except (RedisError, OSError):
            pass


def _ngram_entries(fingerprint: str, put: ngrams.NgramPut) -> dict[str, list[bytes]]:
    """Context key -> its continuations (msgpack), sorted: the same request, the same calls."""
    return {keys.ngram_key(fingerprint, ctx): [ngrams.encode_continuation(c)
                                               for c in sorted(conts)]
            for ctx, conts in ngrams.ngram_pairs(put).items()}


def _check_fingerprint(fingerprint: str, field: str) -> None:
    if not fingerprint:
        raise InvalidRequest(field, "required (the model fingerprint salts every key)")
    if len(fingerprint) > MAX_FINGERPRINT_CHARS:
        raise InvalidRequest(field, f"longer than {MAX_FINGERPRINT_CHARS} characters")


def _check_tokens(token_ids: Sequence[int], field: str, required: bool = False) -> None:
    if required and not token_ids:
        raise InvalidRequest(field, "must not be empty")
    if len(token_ids) > MAX_TOKENS:
        raise InvalidRequest(field, f"{len(token_ids)} tokens, more than {MAX_TOKENS}")
    if token_ids and not 0 <= min(token_ids) <= max(token_ids) <= MAX_TOKEN_ID:
        raise InvalidRequest(field, "token ids must be non-negative")


def _check_keys(chunk_keys: Sequence[str], field: str) -> None:
    if len(chunk_keys) > MAX_KEYS:
        raise InvalidRequest(field, f"{len(chunk_keys)} keys, more than {MAX_KEYS}")
    for i, key in enumerate(chunk_keys):
        if not keys.is_key(key):
            raise InvalidRequest(f"{field}[{i}]", f"{key[:80]!r} is not a chunk key (64 hex)")


def _check_result_key(f: ResultKeyFields) -> ResultKeyFields:
    """Validate; field names are those of ResultKey in cache.proto."""
    _check_fingerprint(f.target_fingerprint, "key.target_fingerprint")
    if len(f.draft_fingerprint) > MAX_FINGERPRINT_CHARS:
        raise InvalidRequest("key.draft_fingerprint", f"longer than {MAX_FINGERPRINT_CHARS}")
    _check_tokens(f.prompt_token_ids, "key.prompt_token_ids", required=True)
    if not f.temperature >= 0:  # also rejects NaN
        raise InvalidRequest("key.sampling.temperature", f"{f.temperature} must be >= 0")
    if not 0 < f.top_p <= 1:
        raise InvalidRequest("key.sampling.top_p", f"{f.top_p} must be in (0, 1]")
    if f.top_k < 0:
        raise InvalidRequest("key.sampling.top_k", f"{f.top_k} must be >= 0")
    if not f.deterministic:
        raise InvalidRequest("key.sampling.seed", "required when temperature > 0: only "
                             "deterministic requests are cached")
    if f.max_new_tokens <= 0:
        raise InvalidRequest("key.max_new_tokens", f"{f.max_new_tokens} must be >= 1")
    return f
