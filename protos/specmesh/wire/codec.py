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


def model_info(loaded) -> common_pb2.ModelInfo:
    """ModelInfo of a loaded model (duck-typed: `.name`, `.fingerprint`, `.config`)."""
    cfg = loaded.config
    return common_pb2.ModelInfo(
        name=loaded.name, vocab_size=cfg.vocab_size, max_context=cfg.max_position_embeddings,
        fingerprint=loaded.fingerprint, bos_token_id=cfg.bos_token_id or 0,
        eos_token_id=cfg.eos_token_id if cfg.eos_token_id is not None else -1)
