"""The knobs of a model service (draft or verify), each written once with its help text.

`EngineConfig` is what an engine needs (its KV cache); `ModelServiceConfig` is everything a
service process needs, engine knobs included, and its command line is built from its fields
(`specmesh.wire.config_args`), so a default lives here and nowhere else.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from specmesh.wire.config_args import add_dataclass_args, from_args
from specmesh.wire.security import Security

DTYPES = ("float32", "float16", "bfloat16")
QUANTIZE = ("none", "int8")


@dataclass(frozen=True)
class EngineConfig:
    kv_cache_mb: float = 1024.0
    """Memory cap of the paged KV cache, MiB."""
    block_size: int = 16
    """Tokens per KV block."""
    idle_evict_s: float = 60.0
    """Sequences idle this long may be evicted when the KV cache is full."""

    def __post_init__(self):
        if self.kv_cache_mb <= 0:
            raise ValueError(f"kv_cache_mb: {self.kv_cache_mb} must be positive")
        if self.block_size <= 0:
            raise ValueError(f"block_size: {self.block_size} must be positive")


@dataclass(frozen=True)
class ModelServiceConfig:
    model: str | None = None
    """HF model folder (required unless --method ngram)."""
    method: str = "model"
    """Draft service only: 'model' drafts with --model (and serves ngram:N trees too);
    'ngram' loads no model and drafts every request by n-gram lookup in its own tokens."""
    host: str = "127.0.0.1"
    """Interface to bind."""
    port: int = 0
    """gRPC port; 0 picks a free one (printed on start)."""
    device: str = "cpu"
    """torch device ('cpu', 'cuda', 'cuda:1')."""
    dtype: str = "float32"
    """Weights and KV dtype: float32, float16 or bfloat16."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """The engine's KV cache (flags --kv-cache-mb, --block-size, --idle-evict-s)."""
    max_batch_tokens: int = 2048
    """Most tokens one batched forward may carry."""
    max_wait_ms: float = 2.0
    """How long the batcher waits for more callers after the first item arrives."""
    metrics_port: int | None = None
    """Prometheus /metrics port; None = no metrics server."""
    metrics_host: str = "127.0.0.1"
    """Interface the metrics server binds (0.0.0.0 to let a scraper on another host in)."""
    cache_addr: str | None = None
    """host:port of the cache service for prefix KV; None = no prefix cache."""
    ngram_fleet_key: str | None = None
    """Draft service only: share n-gram drafting's continuations with every draft service of
    the fleet through the cache service (needs --cache-addr), in the table of this key: the
    target model's fingerprint (its GetModelInfo, `specmesh info`), or any name that stands for
    the target model and its tokenizer. None = each sequence's own tokens only."""
    batch_invariant: bool = False
    """Bitwise batch-invariant logits (row-wise GEMVs, per-query attention): a sequence's
    output never depends on its batch mates or its tree. Much slower; for reproducibility."""
    quantize: str = "none"
    """Draft service only: 'int8' keeps the draft's projection weights in int8 with a scale per
    output row (CPU kernels; about half the bytes of fp16 a draft step reads). Proposals may
    differ at near-ties (acceptance); the output never does: the target verifies every token.
    'none' keeps the checkpoint's weights."""
    threads: int | None = None
    """torch/OpenMP threads of the service's one torch thread; None = torch's default (one per
    core). The draft model is small enough that one thread can beat two (no team wake-ups)."""
    max_message_mb: float = 64.0
    """Largest request or response message, MiB (a batched Verify carries every running
    sequence's tree and, when sampling, its draft distributions)."""
    prefix_chunk_size: int = 16
    """Tokens per prefix-KV chunk in the cache (part of every chunk key: the draft and verify
    services of one deployment should agree, though each model has its own keys anyway)."""
    security: Security = field(default_factory=Security)
    """TLS, tokens and the cache HMAC key (flags --tls-cert, --token-file, ...; see
    specmesh.wire.security)."""

    def __post_init__(self):
        if self.max_message_mb <= 0:
            raise ValueError(f"max_message_mb: {self.max_message_mb} must be positive")
        if self.prefix_chunk_size <= 0:
            raise ValueError(f"prefix_chunk_size: {self.prefix_chunk_size} must be positive")
        if self.max_batch_tokens <= 0 or self.max_wait_ms < 0:
            raise ValueError("max_batch_tokens must be positive, max_wait_ms >= 0")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads: {self.threads} must be >= 1")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: {self.dtype!r} not in {'/'.join(DTYPES)}")
        if self.quantize not in QUANTIZE:
            raise ValueError(f"quantize: {self.quantize!r} not in {'/'.join(QUANTIZE)}")
        if self.method not in ("model", "ngram"):
            raise ValueError(f"method: {self.method!r} not in model/ngram")
        if self.ngram_fleet_key is not None and not (self.ngram_fleet_key and self.cache_addr):
            raise ValueError("--ngram-fleet-key needs a non-empty key and --cache-addr (the "
                             "cache service holds the fleet table)")
        if self.method == "model" and not self.model:
            raise ValueError("--model is required (a draft service may run --method ngram "
                             "without one)")

    @classmethod
    def from_flat(cls, **values: Any) -> "ModelServiceConfig":
        """Built from flat keywords as on the command line (`kv_cache_mb=8` goes to `engine`)."""
        engine_keys = {f.name for f in fields(EngineConfig)}
        engine = EngineConfig(**{k: values.pop(k) for k in list(values) if k in engine_keys})
        return cls(**values, engine=engine)


def parse_service_args(prog: str, argv: list[str] | None = None,
                       defaults: Mapping[str, Any] | None = None) -> ModelServiceConfig:
    """A service's command line; `defaults` are that service's own (e.g. the draft's)."""
    parser = argparse.ArgumentParser(prog=prog)
    add_dataclass_args(parser, ModelServiceConfig, defaults)
    return from_args(ModelServiceConfig, parser.parse_args(argv))
