"""Stored chunk values: msgpack round trip; corrupt, foreign or old entries are rejected."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from specmesh.cache_service import codec
from specmesh.cache_service.codec import CachedResult, RejectedEntry

FP = "model-a"


def _chunk(dtype="float16") -> codec.ChunkData:
    arr = np.random.default_rng(0).standard_normal((2, 2, 4, 3, 8)).astype(dtype)
    return codec.make_chunk(arr.dtype.name, arr.shape, arr.tobytes())


@pytest.mark.parametrize("dtype", ["float16", "float32", "uint16"])
def test_round_trip(dtype):
    chunk = _chunk(dtype)
    out = codec.decode_chunk(codec.encode_chunk(FP, chunk), FP)
    assert out == chunk
    assert out.array().dtype == np.dtype(dtype) and out.array().shape == (2, 2, 4, 3, 8)
    np.testing.assert_array_equal(out.array(), np.frombuffer(chunk.data, dtype).reshape(out.shape))


def test_never_pickle():
    blob = codec.encode_chunk(FP, _chunk())
    assert not blob.startswith(b"\x80")  # pickle protocol marker
    assert msgpack.unpackb(blob)["v"] == codec.FORMAT_VERSION


def _tamper(blob: bytes, **changes) -> bytes:
    entry = msgpack.unpackb(blob)
    entry.update(changes)
    return msgpack.packb(entry)


def test_corrupt_checksum_rejected():
    chunk = _chunk()
    blob = codec.encode_chunk(FP, chunk)
    flipped = bytearray(chunk.data)
    flipped[5] ^= 0xFF
    with pytest.raises(RejectedEntry) as err:
        codec.decode_chunk(_tamper(blob, data=bytes(flipped)), FP)
    assert err.value.reason == "checksum"


def test_foreign_fingerprint_rejected():
    blob = codec.encode_chunk("model-b", _chunk())
    with pytest.raises(RejectedEntry) as err:
        codec.decode_chunk(blob, FP)
    assert err.value.reason == "fingerprint"


def test_wrong_version_rejected():
    blob = _tamper(codec.encode_chunk(FP, _chunk()), v=codec.FORMAT_VERSION + 1)
    with pytest.raises(RejectedEntry) as err:
        codec.decode_chunk(blob, FP)
    assert err.value.reason == "version"


@pytest.mark.parametrize("blob", [b"", b"\x80\x04garbage", msgpack.packb([1, 2]),
                                  msgpack.packb({"v": 1, "fp": FP}),
                                  msgpack.packb({"v": 1, "fp": FP, "dtype": "object",
                                                 "shape": [1], "data": b"x", "sha256": b""})])
def test_malformed_rejected(blob):
    with pytest.raises(RejectedEntry) as err:
        codec.decode_chunk(blob, FP)
    assert err.value.reason == "malformed"


def test_size_mismatch_rejected():
    blob = _tamper(codec.encode_chunk(FP, _chunk()), shape=[2, 2, 4, 3, 9])
    with pytest.raises(RejectedEntry):
        codec.decode_chunk(blob, FP)


def test_make_chunk_checks_size():
    with pytest.raises(ValueError):
        codec.make_chunk("float32", (2, 3), b"\0" * 23)
    with pytest.raises(ValueError):
        codec.make_chunk("complex64", (1,), b"\0" * 8)


def test_result_round_trip_and_rejects():
    result = CachedResult((1, 2, 70000), "eos")
    assert codec.decode_result(codec.encode_result(result)) == result
    with pytest.raises(RejectedEntry):
        codec.decode_result(_tamper(codec.encode_result(result), v=99))
    with pytest.raises(RejectedEntry):
        codec.decode_result(b"not msgpack \xc1")
