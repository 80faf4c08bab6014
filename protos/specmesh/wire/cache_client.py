"""Async CacheService client for the draft/verify services and the client library (no torch).

Every method answers a miss (PrefixHit(0, ()), [], None, 0, False) on any cache trouble: the
service down, slow (short deadlines), a bad reply, even a rejected request. Nothing here raises
into a generation; failures are logged and counted in `CacheClient.stats`. After an UNAVAILABLE or
DEADLINE_EXCEEDED the client answers misses without calling for `retry_after_s`.

    cache = CacheClient("127.0.0.1:50052")
    hit = await cache.lookup_prefix(fingerprint, token_ids, chunk_size=16)
    arrays = await cache.get_chunks(fingerprint, hit.keys)      # leading chunks that arrived
    ...
    await cache.put_chunks(fingerprint, token_ids, 16, start_chunk=len(arrays), arrays=new)
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import grpc
import numpy as np

from specmesh.v1 import cache_pb2, cache_pb2_grpc, common_pb2
from specmesh.wire.cache_mac import chunk_mac, result_mac, verified
from specmesh.wire.security import Security
from specmesh.wire.server import CHANNEL_OPTIONS

log = logging.getLogger(__name__)
T = TypeVar("T")
_BACK_OFF_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


@dataclass(frozen=True)
class PrefixHit:
    """The cached leading chunks of a sequence (a miss is PrefixHit(0, ()))."""

    num_tokens: int = 0  # len(keys) * chunk_size
    keys: tuple[str, ...] = ()  # hex chunk keys, in order; pass to get_chunks


@dataclass(frozen=True)
class CachedResult:
    token_ids: list[int]  # generated ids only
    finish_reason: str


@dataclass
class CacheClientStats:
    hits: int = 0  # prefix lookups with >= 1 chunk, result hits
    misses: int = 0
    errors: int = 0  # failed calls (each answered as a miss)
    skipped: int = 0  # calls not made (backing off after an error, or not cacheable)
    rejected: int = 0  # values without a valid MAC (not written by a fleet member): misses


def result_key(*, target_fingerprint: str, prompt_token_ids: Sequence[int],
               sampling: common_pb2.SamplingParams, max_new_tokens: int,
               draft_fingerprint: str = "", stop: Sequence[str] = (), ignore_eos: bool = False,
               extra: str = "") -> cache_pb2.ResultKey:
    """The result-cache key of a request: every field that decides its output."""
    return cache_pb2.ResultKey(
        draft_fingerprint=draft_fingerprint, target_fingerprint=target_fingerprint,
        prompt_token_ids=[int(t) for t in prompt_token_ids], sampling=sampling,
        max_new_tokens=max_new_tokens, stop=list(stop), ignore_eos=ignore_eos, extra=extra)


def is_cacheable(key: cache_pb2.ResultKey) -> bool:
    """Only deterministic requests are cached: greedy, or sampling with a seed."""
    return key.sampling.temperature == 0 or key.sampling.HasField("seed")


class CacheClient:
    """Async client of one CacheService address. Use inside a running event loop."""

    def __init__(self, address: str, *, timeout_s: float = 0.5, transfer_timeout_s: float = 10.0,
                 piece_bytes: int = 1 << 20, retry_after_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic, security: Security | None = None):
        self.address = address
        self.security = security or Security()  # TLS, token, and the fleet's cache MAC key
        self.mac_key = self.security.cache_key  # None: values are not signed or checked
        self.timeout_s = timeout_s  # lookups and results
        self.transfer_timeout_s = transfer_timeout_s  # whole GetChunks / PutChunks streams
        self.piece_bytes = piece_bytes
        self.retry_after_s = retry_after_s
        self.stats = CacheClientStats()
        self._clock = clock
        self._down_until = float("-inf")
        self._channel: grpc.aio.Channel | None = None
        self._stub_obj: cache_pb2_grpc.CacheServiceStub | None = None

    @property
    def _stub(self) -> cache_pb2_grpc.CacheServiceStub:
        if self._stub_obj is None:
            self._channel = self.security.channel(self.address, CHANNEL_OPTIONS)
            self._stub_obj = cache_pb2_grpc.CacheServiceStub(self._channel)
        return self._stub_obj

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
        self._channel = self._stub_obj = None

    async def __aenter__(self) -> CacheClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -- prefix KV ------------------------------------------------------------------------------
    async def lookup_prefix(self, fingerprint: str, token_ids: Sequence[int],
                            chunk_size: int) -> PrefixHit:
        """Longest cached chunk-aligned prefix of `token_ids` (a miss: PrefixHit(0, ()))."""
        async def call() -> PrefixHit:
            reply = await self._stub.LookupPrefix(cache_pb2.LookupPrefixRequest(
                fingerprint=fingerprint, token_ids=[int(t) for t in token_ids],
                chunk_size=chunk_size), timeout=self.timeout_s)
            return PrefixHit(reply.num_tokens, tuple(reply.chunk_keys))

        hit = await self._guard("lookup_prefix", call, PrefixHit())
        self._count(hit.num_tokens > 0)
        return hit

    async def get_chunks(self, fingerprint: str, keys: Sequence[str],
                         token_ids: Sequence[int] = (), chunk_size: int = 0) -> list[np.ndarray]:
        """The arrays of the leading `keys` that arrived whole and checked (maybe fewer, or []).
        With a MAC key each chunk must carry the writer's MAC over its fingerprint and the
        tokens it stands for (`token_ids` from position 0, `chunk_size`): the first that does
        not ends the hit."""
        arrays: list[np.ndarray] = []
        if keys:
            check = None
            if self.mac_key is not None:
                tokens = [int(t) for t in token_ids]

                def check(i: int, meta: cache_pb2.ChunkMeta) -> bool:
                    end = (i + 1) * chunk_size
                    return end <= len(tokens) and verified(chunk_mac(
                        self.mac_key, fingerprint, chunk_size, tokens[:end], meta.dtype,
                        meta.shape, meta.sha256), meta.mac)
            await self._guard("get_chunks",
                              lambda: self._read_chunks(fingerprint, keys, arrays, check), None)
        return arrays

    async def load_prefix(self, fingerprint: str, token_ids: Sequence[int],
                          chunk_size: int) -> list[np.ndarray]:
        """lookup_prefix + get_chunks: arrays of the cached leading chunks (len * chunk_size
        tokens covered)."""
        hit = await self.lookup_prefix(fingerprint, token_ids, chunk_size)
        if not hit.keys:
            return []
        return await self.get_chunks(fingerprint, hit.keys, token_ids, chunk_size)

    async def put_chunks(self, fingerprint: str, token_ids: Sequence[int], chunk_size: int,
                         start_chunk: int, arrays: Sequence[np.ndarray]) -> int:
        """Store chunks start_chunk, start_chunk + 1, ... (one array each, any shape; the KV
        services use [num_layers, 2, chunk_size, num_kv_heads, head_dim]). `token_ids` is the
        sequence from position 0 through at least the last chunk. Returns chunks stored."""
        if not arrays:
            return 0
        tokens = [int(t) for t in token_ids[:(start_chunk + len(arrays)) * chunk_size]]
        header = cache_pb2.PutChunksHeader(fingerprint=fingerprint, token_ids=tokens,
                                           chunk_size=chunk_size, start_chunk=start_chunk)

        def sign(index: int, meta: cache_pb2.ChunkMeta) -> None:
            if self.mac_key is not None:
                end = (start_chunk + index + 1) * chunk_size
                meta.mac = chunk_mac(self.mac_key, fingerprint, chunk_size, tokens[:end],
                                     meta.dtype, meta.shape, meta.sha256)

        async def messages():
            yield cache_pb2.PutChunksRequest(header=header)
            for index, array in enumerate(arrays):
                for piece in _pieces(index, array, self.piece_bytes, sign):
                    yield cache_pb2.PutChunksRequest(piece=piece)

        async def call() -> int:
            reply = await self._stub.PutChunks(messages(), timeout=self.transfer_timeout_s)
            return reply.num_stored

        return await self._guard("put_chunks", call, 0)

    # -- results --------------------------------------------------------------------------------
    async def get_result(self, key: cache_pb2.ResultKey) -> CachedResult | None:
        """The cached output of a deterministic request, or None."""
        if not is_cacheable(key):
            self.stats.skipped += 1
            return None

        async def call() -> CachedResult | None:
            reply = await self._stub.GetResult(cache_pb2.GetResultRequest(key=key),
                                               timeout=self.timeout_s)
            if not reply.hit:
                return None
            if self.mac_key is not None and not verified(result_mac(
                    self.mac_key, key, reply.token_ids, reply.finish_reason), reply.mac):
                self.stats.rejected += 1
                log.warning("cache result at %s without a valid MAC: a miss", self.address)
                return None
            return CachedResult(list(reply.token_ids), reply.finish_reason)

        result = await self._guard("get_result", call, None)
        self._count(result is not None)
        return result

    async def put_result(self, key: cache_pb2.ResultKey, token_ids: Sequence[int],
                         finish_reason: str) -> bool:
        """Cache a finished deterministic generation. True if stored."""
        if not is_cacheable(key):
            self.stats.skipped += 1
            return False

        async def call() -> bool:
            tokens = [int(t) for t in token_ids]
            mac = (result_mac(self.mac_key, key, tokens, finish_reason)
                   if self.mac_key is not None else b"")
            reply = await self._stub.PutResult(cache_pb2.PutResultRequest(
                key=key, token_ids=tokens, finish_reason=finish_reason, mac=mac),
                timeout=self.timeout_s)
            return reply.stored

        return await self._guard("put_result", call, False)

    # -- fleet n-gram table ---------------------------------------------------------------------
    async def put_ngrams(self, fingerprint: str, token_ids: Sequence[int], *, first: int = 0,
                         end: int = 0, min_n: int = 2, max_n: int = 4, max_depth: int = 8,
                         timeout_s: float | None = None) -> int:
        """Count the continuations starting at positions [first, end) of `token_ids` (end 0 =
        the end) after their contexts of min_n..max_n tokens, in the table of `fingerprint`
        (the target model). The (context, continuation) pairs counted; 0 on any trouble."""
        async def call() -> int:
            reply = await self._stub.PutNgrams(cache_pb2.PutNgramsRequest(
                fingerprint=fingerprint, token_ids=[int(t) for t in token_ids],
                first_position=first, end_position=end, min_n=min_n, max_n=max_n,
                max_depth=max_depth), timeout=timeout_s or self.timeout_s)
            return reply.num_ngrams

        return await self._guard("put_ngrams", call, 0)

    async def get_ngrams(self, fingerprint: str, contexts: Sequence[Sequence[int]],
                         max_continuations: int = 0, timeout_s: float | None = None
                         ) -> list[list[tuple[tuple[int, ...], int]]] | None:
        """Per context (1..8 tokens), its most counted (continuation tokens, count) pairs in the
        table of `fingerprint`, most counted first. None on any trouble (a miss for all)."""
        if not contexts:
            return []

        async def call() -> list[list[tuple[tuple[int, ...], int]]]:
            reply = await self._stub.GetNgrams(cache_pb2.GetNgramsRequest(
                fingerprint=fingerprint,
                contexts=[cache_pb2.NgramContext(token_ids=[int(t) for t in c])
                          for c in contexts],
                max_continuations=max_continuations), timeout=timeout_s or self.timeout_s)
            if len(reply.entries) != len(contexts):
                raise ValueError(f"{len(reply.entries)} entries for {len(contexts)} contexts")
            return [[(tuple(c.token_ids), c.count) for c in entry.continuations]
                    for entry in reply.entries]

        found = await self._guard("get_ngrams", call, None)
        if found is not None:
            self._count(any(found))
        return found

    async def server_stats(self) -> cache_pb2.StatsResponse | None:
        return await self._guard("stats", lambda: self._stub.Stats(
            cache_pb2.StatsRequest(), timeout=self.timeout_s), None)

    # -- plumbing -------------------------------------------------------------------------------
    async def _read_chunks(self, fingerprint: str, keys: Sequence[str], out: list[np.ndarray],
                           check: Callable[[int, cache_pb2.ChunkMeta], bool] | None) -> None:
        """Append each chunk to `out` once it arrived whole, its sha256 matches and `check`
        (the MAC) passes; the first chunk that fails the check ends the read."""
        call = self._stub.GetChunks(cache_pb2.GetChunksRequest(
            fingerprint=fingerprint, chunk_keys=list(keys)), timeout=self.transfer_timeout_s)
        meta, buf, received = None, bytearray(), 0
        async for piece in call:
            if piece.HasField("meta"):
                if meta is not None or piece.index != len(out) or piece.offset != 0:
                    raise ValueError(f"unexpected piece order at chunk {piece.index}")
                if check is not None and not check(piece.index, piece.meta):
                    self.stats.rejected += 1
                    log.warning("cache chunk %d at %s without a valid MAC: a miss from there",
                                piece.index, self.address)
                    call.cancel()
                    return
                meta, buf, received = piece.meta, bytearray(piece.meta.num_bytes), 0
            if meta is None or piece.offset != received \
                    or received + len(piece.data) > meta.num_bytes:
                raise ValueError(f"unexpected piece at chunk {piece.index} offset {piece.offset}")
            buf[received:received + len(piece.data)] = piece.data
            received += len(piece.data)
            if received == meta.num_bytes:
                out.append(_to_array(meta, buf))
                meta = None

    async def _guard(self, op: str, call: Callable[[], Awaitable[T]], miss: T) -> T:
        """Run `call`; on any failure log, count and return `miss` (never raise)."""
        now = self._clock()
        if now < self._down_until:
            self.stats.skipped += 1
            return miss
        try:
            return await call()
        except grpc.aio.AioRpcError as err:
            self.stats.errors += 1
            if err.code() in _BACK_OFF_CODES:
                self._down_until = now + self.retry_after_s
            level = logging.ERROR if err.code() == grpc.StatusCode.INVALID_ARGUMENT \
                else logging.WARNING
            log.log(level, "cache %s at %s failed: %s %s; treating as a miss", op,
                    self.address, err.code().name, err.details())
        except Exception as exc:  # noqa: BLE001 - cache trouble never fails a generation
            self.stats.errors += 1
            log.warning("cache %s at %s failed: %s: %s; treating as a miss", op, self.address,
                        type(exc).__name__, exc)
        return miss

    def _count(self, hit: bool) -> None:
        if hit:
            self.stats.hits += 1
        else:
            self.stats.misses += 1


def _pieces(index: int, array: np.ndarray, piece_bytes: int,
            sign: Callable[[int, cache_pb2.ChunkMeta], None]):
    """ChunkPieces of one array (little-endian, C order), meta (signed by `sign`) on the
    first."""
    a = np.ascontiguousarray(array)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    data = memoryview(a).cast("B")
    meta = cache_pb2.ChunkMeta(dtype=a.dtype.name, shape=a.shape, num_bytes=len(data),
                               sha256=hashlib.sha256(data).digest())
    sign(index, meta)
    for offset in range(0, max(len(data), 1), piece_bytes):
        yield cache_pb2.ChunkPiece(index=index, meta=meta if offset == 0 else None,
                                   offset=offset, data=bytes(data[offset:offset + piece_bytes]))


def _to_array(meta: cache_pb2.ChunkMeta, buf: bytearray) -> np.ndarray:
    if meta.sha256 and hashlib.sha256(buf).digest() != meta.sha256:
        raise ValueError("chunk sha256 mismatch in transit")
    dtype = np.dtype(meta.dtype).newbyteorder("<")
    return np.frombuffer(buf, dtype=dtype).reshape(tuple(meta.shape))  # writable: a bytearray
