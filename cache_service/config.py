"""CacheServiceConfig: every knob of the cache service, built once from CLI args."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from specmesh.wire.config_args import add_dataclass_args, from_args
from specmesh.wire.security import Security


@dataclass(frozen=True)
class CacheServiceConfig:
    redis_url: str = "redis://127.0.0.1:6379/0"
    """Redis to store in (redis:// or rediss://, optional /db; redis+cluster://host:port for a
    Redis Cluster, any node). Eviction is Redis's own:
    run it with `--maxmemory <size> --maxmemory-policy allkeys-lru`."""
    host: str = "127.0.0.1"
    """Interface to bind."""
    port: int = 0
    """gRPC port; 0 picks a free one (printed on start)."""
    chunk_ttl_s: int = 3600
    """Lifetime of a prefix-KV chunk, seconds; 0 = no TTL (LRU eviction only)."""
    result_ttl_s: int = 3600
    """Lifetime of a result-cache entry, seconds; 0 = no TTL (LRU eviction only)."""
    ngram_ttl_s: int = 86400
    """Lifetime of a fleet n-gram context's table since it was last counted, seconds; 0 = no
    TTL (LRU eviction only)."""
    ngram_max_continuations: int = 16
    """Continuations kept per n-gram context (the most counted; space-saving replacement)."""
    max_result_bytes: int = 1 << 20
    """Results whose stored value is bigger than this are not cached."""
    max_chunk_bytes: int = 64 << 20
    """KV chunks bigger than this are not cached (and not buffered while they stream in)."""
    piece_bytes: int = 1 << 20
    """GetChunks streams each chunk in pieces of at most this many bytes."""
    max_message_bytes: int = 4 << 20
    """Largest gRPC message either way (chunks stream in pieces of piece_bytes)."""
    redis_timeout_s: float = 0.5
    """Socket (connect and read) timeout of every Redis call; a slow Redis is a miss."""
    retry_after_s: float = 1.0
    """After a Redis connection failure or timeout, answer misses without trying Redis for this
    long, so a dead Redis costs no latency."""
    metrics_port: int | None = None
    """Prometheus /metrics port; None = no metrics server."""
    metrics_host: str = "127.0.0.1"
    """Interface the metrics server binds (0.0.0.0 to let a scraper on another host in)."""
    security: Security = field(default_factory=Security)
    """TLS and tokens (flags --tls-cert, --token-file, ...; see specmesh.wire.security); writes
    need a `service` token. rediss:// URLs take TLS options as query parameters."""

    def __post_init__(self):
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://",
                                          "redis+cluster://", "rediss+cluster://")):
            raise ValueError(f"redis_url {self.redis_url!r} must start with redis://, "
                             "rediss://, unix:// or redis+cluster:// (rediss+cluster://)")
        if min(self.chunk_ttl_s, self.result_ttl_s, self.ngram_ttl_s) < 0:
            raise ValueError("chunk_ttl_s, result_ttl_s and ngram_ttl_s must be >= 0")
        if not 1 <= self.ngram_max_continuations <= 256:
            raise ValueError("ngram_max_continuations must be in [1, 256]")
        if min(self.max_result_bytes, self.max_chunk_bytes, self.piece_bytes) <= 0:
            raise ValueError("max_result_bytes, max_chunk_bytes and piece_bytes must be positive")
        if self.piece_bytes > self.max_message_bytes - (64 << 10):
            raise ValueError("piece_bytes must be at least 64 KiB under max_message_bytes")
        if self.redis_timeout_s <= 0 or self.retry_after_s < 0:
            raise ValueError("redis_timeout_s must be positive, retry_after_s >= 0")


def build_parser(prog: str = "specmesh serve cache") -> argparse.ArgumentParser:
    """One flag per config field (--redis-url, --chunk-ttl-s, ...): type, default and help
    from the dataclass."""
    parser = argparse.ArgumentParser(prog=prog, description="Redis-backed prefix-KV and result "
                                     "cache service (gRPC specmesh.v1.CacheService).")
    add_dataclass_args(parser, CacheServiceConfig)
    return parser


def parse_args(argv: list[str] | None = None) -> CacheServiceConfig:
    return from_args(CacheServiceConfig, build_parser().parse_args(argv))
