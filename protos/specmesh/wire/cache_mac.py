"""HMACs that make cache values unforgeable by anyone without the fleet key.

The writer (a model service for prefix chunks, a gateway or client library for results) computes
the MAC; the cache service stores it with the value and returns it; the reader recomputes it and
treats a value whose MAC is missing or wrong as a miss. Each MAC covers what the value stands for,
not only its bytes: a chunk's model fingerprint, chunk size and every token up to its end; a
result's whole key (fingerprints, prompt, sampling, limits) and its tokens and finish reason. So a
genuine value cannot be replayed under another prefix or request either.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

import numpy as np

from specmesh.v1 import cache_pb2


def _tokens(token_ids: Sequence[int]) -> bytes:
    return np.asarray(token_ids, dtype="<i4").tobytes()  # [n] little-endian int32


def chunk_mac(key: bytes, fingerprint: str, chunk_size: int, prefix_tokens: Sequence[int],
              dtype: str, shape: Sequence[int], sha256: bytes) -> bytes:
    """MAC of the chunk that ends the token prefix `prefix_tokens` (its last chunk_size tokens)."""
    h = hmac.new(key, digestmod=hashlib.sha256)
    for part in (b"specmesh-chunk-v1", fingerprint.encode(), str(chunk_size).encode(),
                 _tokens(prefix_tokens), dtype.encode(),
                 _tokens([int(d) for d in shape]), sha256):
        h.update(len(part).to_bytes(8, "little"))  # length-prefixed: no ambiguous joins
        h.update(part)
    return h.digest()


def result_mac(key: bytes, result_key: cache_pb2.ResultKey, token_ids: Sequence[int],
               finish_reason: str) -> bytes:
    h = hmac.new(key, digestmod=hashlib.sha256)
    for part in (b"specmesh-result-v1", result_key.SerializeToString(deterministic=True),
                 _tokens(token_ids), finish_reason.encode()):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.digest()


def verified(expected: bytes, got: bytes) -> bool:
    return bool(got) and hmac.compare_digest(expected, got)
