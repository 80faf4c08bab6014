"""Redis storage layout over redis.asyncio: where chunks and results live, with TTLs.

    specmesh:v2:kvdata:{<key>}  chunk payload (codec.encode_chunk bytes)
    specmesh:v2:kv:{<key>}      chunk marker (payload size); written only after the payload, so a
                                reader that sees a marker never sees half an entry
    specmesh:v2:res:{<key>}     result value (codec.encode_result bytes)
    specmesh:v2:ng:{<key>}      n-gram context: sorted set, member = continuation (msgpack list
                                of ints), score = count; at most `cap` members (space-saving:
                                a newcomer to a full set replaces the least counted member and
                                takes its count + 1), one Lua call per context (atomic)

The `{<key>}` hash tag puts a chunk's payload and marker in one Redis Cluster slot. A URL
`redis+cluster://host:port` (or `rediss+cluster://`) selects Redis Cluster
(`redis.asyncio.cluster.RedisCluster`: MOVED/ASK handled there; multi-key reads split by slot).

Errors propagate (redis.RedisError, OSError, asyncio.TimeoutError); the engine turns them into
misses. Eviction is Redis's own (`maxmemory` + `allkeys-lru`); an evicted payload whose marker
survived reads as a missing chunk.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

NAMESPACE = "specmesh:v2"
CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")


def marker_key(key: str) -> str:
    return f"{NAMESPACE}:kv:{{{key}}}"


def payload_key(key: str) -> str:
    return f"{NAMESPACE}:kvdata:{{{key}}}"


def result_store_key(key: str) -> str:
    return f"{NAMESPACE}:res:{{{key}}}"


def ngram_store_key(key: str) -> str:
    return f"{NAMESPACE}:ng:{{{key}}}"


# KEYS[1] the context; ARGV: cap, ttl_s, then the continuations seen (each counted once)
NGRAM_COUNT_LUA = """
local cap = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
for i = 3, #ARGV do
  local m = ARGV[i]
  if redis.call('ZSCORE', KEYS[1], m) then
    redis.call('ZINCRBY', KEYS[1], 1, m)
  elseif redis.call('ZCARD', KEYS[1]) < cap then
    redis.call('ZADD', KEYS[1], 1, m)
  else
    local low = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    redis.call('ZREM', KEYS[1], low[1])
    redis.call('ZADD', KEYS[1], tonumber(low[2]) + 1, m)
  end
end
if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl) end
return 0
"""


class RedisStore:
    """Chunk and result storage on one Redis (a redis.asyncio client, usually from a URL)."""

    def __init__(self, client):
        self.client = client  # redis.asyncio Redis or RedisCluster
        self.cluster = isinstance(client, RedisCluster)
        self._count_ngrams = client.register_script(NGRAM_COUNT_LUA)

    @classmethod
    def from_url(cls, url: str, timeout_s: float) -> RedisStore:
        """Short socket timeouts and one immediate retry (a fresh connection after a restart);
        redis+cluster:// (rediss+cluster://) for Redis Cluster."""
        options = dict(socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                       decode_responses=False)
        if url.startswith(CLUSTER_SCHEMES):
            plain = url.replace("+cluster", "", 1)
            return cls(RedisCluster.from_url(plain, **options))
        return cls(aioredis.from_url(url, retry=Retry(NoBackoff(), 1), **options))

    async def ping(self) -> bool:
        return bool(await self.client.ping())

    async def has_chunks(self, keys: Sequence[str]) -> list[bool]:
        """Whether each chunk's marker exists (one round trip)."""
        if not keys:
            return []
        async with self.client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.exists(marker_key(key))
            return [bool(n) for n in await pipe.execute()]

    async def get_chunks(self, keys: Sequence[str]) -> list[bytes | None]:
        """The payload of each key, in order (None where missing); one round trip."""
        if not keys:
            return []
        names = [payload_key(k) for k in keys]
        if self.cluster:  # chunks of one prefix live in different slots
            return await self.client.mget_nonatomic(names)
        return await self.client.mget(names)

    async def put_chunk(self, key: str, payload: bytes, ttl_s: int) -> None:
        """Write the payload, then (only if that succeeded) its marker."""
        ex = ttl_s or None
        await self.client.set(payload_key(key), payload, ex=ex)
        await self.client.set(marker_key(key), len(payload), ex=ex)

    async def get_result(self, key: str) -> bytes | None:
        return await self.client.get(result_store_key(key))

    async def put_result(self, key: str, value: bytes, ttl_s: int) -> None:
        await self.client.set(result_store_key(key), value, ex=ttl_s or None)

    async def put_ngrams(self, entries: Mapping[str, Sequence[bytes]], cap: int,
                         ttl_s: int) -> None:
        """Count each context's continuations (one Lua call per context, pipelined)."""
        if self.cluster:  # contexts live in different slots: one call each
            for key, members in entries.items():
                await self._count_ngrams([ngram_store_key(key)], [cap, ttl_s, *members])
            return
        async with self.client.pipeline(transaction=False) as pipe:
            for key, members in entries.items():
                await self._count_ngrams([ngram_store_key(key)], [cap, ttl_s, *members],
                                         client=pipe)
            await pipe.execute()

    async def get_ngrams(self, keys: Sequence[str], top: int
                         ) -> list[list[tuple[bytes, float]]]:
        """The `top` most counted (continuation, count) of each context; one round trip."""
        if not keys:
            return []
        async with self.client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.zrevrange(ngram_store_key(key), 0, top - 1, withscores=True)
            return await pipe.execute()

    async def close(self) -> None:
        await self.client.aclose()
