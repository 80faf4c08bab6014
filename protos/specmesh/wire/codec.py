"""Conversions between wire messages and plain Python/numpy values."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from specmesh.v1 import common_pb2


@dataclass(frozen=True)
class Sparse:
    """A distribution over its support only."""

    token_ids: np.ndarray  # [support] int32
    probs: np.ndarray  # [support] float16


def encode_sparse(token_ids: np.ndarray, probs: np.ndarray) -> common_pb2.SparseDistribution:
    ids = np.ascontiguousarray(token_ids, dtype=np.int32)
    p16 = np.ascontiguousarray(probs, dtype="<f2")
    return common_pb2.SparseDistribution(token_ids=ids.tolist(), probs_f16=p16.tobytes())


def decode_sparse(msg: common_pb2.SparseDistribution) -> Sparse:
    """Decode one distribution; raises ValueError when lengths disagree."""
    ids = np.asarray(msg.token_ids, dtype=np.int32)
    if len(msg.probs_f16) != 2 * len(ids):
        raise ValueError(f"probs_f16 holds {len(msg.probs_f16)} bytes for {len(ids)} token ids")
    return Sparse(ids, np.frombuffer(msg.probs_f16, dtype="<f2"))
