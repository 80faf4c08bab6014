"""ModelServiceConfig: every knob of a model service (draft or verify), built once from CLI args."""

from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelServiceConfig:
    model: str
    """HF model folder."""
    host: str = "127.0.0.1"
    """Interface to bind."""
    port: int = 0
    """gRPC port; 0 picks a free one (printed on start)."""
    device: str = "cpu"
    """torch device ('cpu', 'cuda', 'cuda:1')."""
    dtype: str = "float32"
    """Weights and KV dtype: float32, float16 or bfloat16."""
    kv_cache_mb: float = 1024.0
    """Memory cap of the paged KV cache, MiB."""
    block_size: int = 16
    """Tokens per KV block."""
    max_batch_tokens: int = 2048
    """Most tokens one batched forward may carry."""
    max_wait_ms: float = 2.0
    """How long the batcher waits for more callers after the first item arrives."""
    idle_evict_s: float = 60.0
    """Sequences idle this long may be evicted when the KV cache is full."""
    metrics_port: int | None = None
    """Prometheus /metrics port; None = no metrics server."""
    cache_addr: str | None = None
    """host:port of the cache service for prefix KV; None = no prefix cache."""
    batch_invariant: bool = False
    """Bitwise batch-invariant logits (row-wise GEMVs, per-query attention): a sequence's
    output never depends on its batch mates or its tree. Much slower; for reproducibility."""
    threads: int | None = None
    """torch/OpenMP threads of the service's one torch thread; None = torch's default (one per
    core). The draft model is small enough that one thread can beat two (no team wake-ups)."""
    max_message_mb: float = 64.0
    """Largest request or response message, MiB (a batched Verify carries every running
    sequence's tree and, when sampling, its draft distributions)."""
    prefix_chunk_size: int = 16
    """Tokens per prefix-KV chunk in the cache (part of every chunk key: the draft and verify
    services of one deployment should agree, though each model has its own keys anyway)."""

    def __post_init__(self):
        if self.kv_cache_mb <= 0 or self.max_message_mb <= 0:
            raise ValueError("kv_cache_mb and max_message_mb must be positive")
        if self.prefix_chunk_size <= 0:
            raise ValueError("prefix_chunk_size must be positive")
        if self.block_size <= 0 or self.max_batch_tokens <= 0 or self.max_wait_ms < 0:
            raise ValueError("block_size and max_batch_tokens must be positive, max_wait_ms >= 0")
        if self.threads is not None and self.threads < 1:
            raise ValueError("threads must be >= 1")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype {self.dtype!r} not in float32/float16/bfloat16")


def add_model_service_args(parser: argparse.ArgumentParser, kv_cache_mb: float,
                           threads: int | None = None) -> None:
    """The flags shared by the draft and verify services (`threads`: the default of --threads)."""
    parser.add_argument("--model", required=True, help="HF model folder")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--kv-cache-mb", type=float, default=kv_cache_mb)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-batch-tokens", type=int, default=2048)
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--idle-evict-s", type=float, default=60.0)
    parser.add_argument("--metrics-port", type=int, default=None)
    parser.add_argument("--cache-addr", default=None, help="cache service host:port")
    parser.add_argument("--batch-invariant", action="store_true",
                        help="bitwise batch-invariant logits (much slower; see README)")
    parser.add_argument("--threads", type=int, default=threads,
                        help="torch/OpenMP threads (default: %(default)s; None = one per core)")
    parser.add_argument("--max-message-mb", type=float, default=64.0,
                        help="largest gRPC message either way, MiB")
    parser.add_argument("--prefix-chunk-size", type=int, default=16,
                        help="tokens per prefix-KV chunk in the cache")


def parse_service_args(prog: str, kv_cache_mb: float, argv: list[str] | None = None,
                       threads: int | None = None) -> ModelServiceConfig:
    parser = argparse.ArgumentParser(prog=prog)
    add_model_service_args(parser, kv_cache_mb=kv_cache_mb, threads=threads)
    return ModelServiceConfig(**vars(parser.parse_args(argv)))
