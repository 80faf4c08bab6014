"""Stored values: prefix-KV chunks and results as msgpack (never pickle), checked on the way out.

A chunk value is a msgpack map

    {"v": FORMAT_VERSION, "fp": model fingerprint, "dtype": "float16", "shape": [...],
     "sha256": 32 bytes over data, "data": raw little-endian C-order bytes}

`decode_chunk` raises `RejectedEntry` (never returns data) for a wrong version, another model's
fingerprint, a bad checksum or anything malformed; callers count it and treat it as a miss.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import msgpack
import numpy as np

FORMAT_VERSION = 1
CHUNK_DTYPES = frozenset({"float16", "float32", "float64", "uint16", "int8", "uint8", "int16",
                          "int32"})  # bfloat16 travels as its uint16 bit pattern


class RejectedEntry(Exception):
    """A stored value that must not be used. `reason`: version, fingerprint, checksum, malformed."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class ChunkData:
    """The raw bytes of one KV chunk and what they are."""

    dtype: str  # numpy dtype name, one of CHUNK_DTYPES
    shape: tuple[int, ...]  # e.g. (num_layers, 2, chunk_size, num_kv_heads, head_dim)
    data: bytes  # prod(shape) * itemsize bytes
    sha256: bytes  # of data
    mac: bytes = b""  # the writer's HMAC, stored and returned as is (checked by readers)

    @property
    def num_bytes(self) -> int:
        return len(self.data)

    def array(self) -> np.ndarray:
        return np.frombuffer(self.data, dtype=np.dtype(self.dtype).newbyteorder("<")) \
            .reshape(self.shape)


def expected_bytes(dtype: str, shape: Sequence[int]) -> int:
    """Byte size of `shape` of `dtype`; ValueError for an unknown dtype or a bad shape."""
    if dtype not in CHUNK_DTYPES:
        raise ValueError(f"dtype {dtype!r} not in {sorted(CHUNK_DTYPES)}")
    if not shape or any(not isinstance(d, int) or d <= 0 for d in shape):
        raise ValueError(f"shape {list(shape)} must have positive dims")
    return math.prod(shape) * np.dtype(dtype).itemsize


def make_chunk(dtype: str, shape: Sequence[int], data: bytes) -> ChunkData:
    """A checked ChunkData (ValueError when data does not fit dtype x shape)."""
    shape = tuple(int(d) for d in shape)
    size = expected_bytes(dtype, shape)
    if len(data) != size:
        raise ValueError(f"{len(data)} bytes for shape {list(shape)} of {dtype} ({size} expected)")
    return ChunkData(dtype, tuple(shape), bytes(data),
                     hashlib.sha256(data).digest())


def encode_chunk(fingerprint: str, chunk: ChunkData) -> bytes:
    return msgpack.packb({"v": FORMAT_VERSION, "fp": fingerprint, "dtype": chunk.dtype,
                          "shape": list(chunk.shape), "sha256": chunk.sha256,
                          "mac": chunk.mac, "data": chunk.data})


def decode_chunk(blob: bytes, fingerprint: str) -> ChunkData:
    """Decode and check a stored chunk; raises RejectedEntry if it must not be loaded."""
    entry = _unpack_map(blob)
    if entry.get("v") != FORMAT_VERSION:
        raise RejectedEntry("version", f"format {entry.get('v')!r}, want {FORMAT_VERSION}")
    if entry.get("fp") != fingerprint:
        raise RejectedEntry("fingerprint", "entry of another model")
    try:
        dtype, shape, data, digest = (entry["dtype"], entry["shape"], entry["data"],
                                      entry["sha256"])
        size = expected_bytes(dtype, shape)
    except (KeyError, TypeError, ValueError) as exc:
        raise RejectedEntry("malformed", str(exc)) from None
    if not isinstance(data, bytes) or len(data) != size:
        raise RejectedEntry("malformed", "data size does not match dtype x shape")
    if hashlib.sha256(data).digest() != digest:
        raise RejectedEntry("checksum", "sha256 mismatch")
    mac = entry.get("mac", b"")
    if not isinstance(mac, bytes):
        raise RejectedEntry("malformed", "mac")
    return ChunkData(dtype, tuple(int(d) for d in shape), data, digest, mac)


@dataclass(frozen=True)
class CachedResult:
    """A finished generation: the generated token ids and why it stopped."""

    token_ids: tuple[int, ...]
    finish_reason: str
    mac: bytes = b""  # the writer's HMAC, stored and returned as is


def encode_result(result: CachedResult) -> bytes:
    tokens = np.asarray(result.token_ids, dtype="<i4")  # [num_generated]
    return msgpack.packb({"v": FORMAT_VERSION, "tokens": tokens.tobytes(),
                          "finish": result.finish_reason, "mac": result.mac})


def decode_result(blob: bytes) -> CachedResult:
    """Decode a stored result; raises RejectedEntry if malformed or of another version."""
    entry = _unpack_map(blob)
    if entry.get("v") != FORMAT_VERSION:
        raise RejectedEntry("version", f"format {entry.get('v')!r}, want {FORMAT_VERSION}")
    tokens, finish, mac = entry.get("tokens"), entry.get("finish"), entry.get("mac", b"")
    if not isinstance(tokens, bytes) or len(tokens) % 4 or not isinstance(finish, str) \
            or not isinstance(mac, bytes):
        raise RejectedEntry("malformed", "result fields")
    return CachedResult(tuple(np.frombuffer(tokens, dtype="<i4").tolist()), finish, mac)


def _unpack_map(blob: bytes) -> dict:
    try:
        entry = msgpack.unpackb(blob, raw=False, strict_map_key=True)
    except Exception as exc:  # noqa: BLE001 - any undecodable bytes are just a rejected entry
        raise RejectedEntry("malformed", f"not msgpack: {type(exc).__name__}") from None
    if not isinstance(entry, dict):
        raise RejectedEntry("malformed", "not a map")
    return entry
