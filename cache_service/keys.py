"""Cache key hashing, nothing else: prefix-chunk hash chains and result-cache keys.

Prefix keys (LMCache style): the token sequence is cut into fixed-size chunks and

    key_0 = sha256(seed || tokens of chunk 0)
    key_i = sha256(key_{i-1} || tokens of chunk i)
    seed  = sha256("specmesh-kv-chain-v1" || chunk_size || model fingerprint)

so a chunk's key names the whole prefix up to its end, the keys of a prefix are the first keys of
any longer sequence, and two models (or chunk sizes) never share an entry. Only full chunks are
keyed: a trailing partial chunk has no key.

Result keys: sha256 of a canonical msgpack of every field that decides the output.

N-gram keys (the fleet n-gram table): sha256("specmesh-ngram-v1" || fingerprint || context), so
the same context under two table keys (models) names two entries.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import msgpack
import numpy as np

CHAIN_TAG = b"specmesh-kv-chain-v1"
RESULT_TAG = "specmesh-result-v1"
NGRAM_TAG = b"specmesh-ngram-v1"
KEY_HEX_LEN = 64  # sha256 hex digest


def chain_seed(fingerprint: str, chunk_size: int) -> bytes:
    """The salt every chain of `fingerprint` at `chunk_size` starts from."""
    return hashlib.sha256(CHAIN_TAG + chunk_size.to_bytes(4, "little") +
                          fingerprint.encode()).digest()


def chunk_keys(fingerprint: str, token_ids: Sequence[int], chunk_size: int) -> list[str]:
    """Hex key of every full chunk of `token_ids` (len(token_ids) // chunk_size keys)."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size {chunk_size} must be positive")
    tokens = np.asarray(token_ids, dtype="<i8")  # [num_tokens] fixed byte layout
    num_chunks = len(tokens) // chunk_size
    digest = chain_seed(fingerprint, chunk_size)
    keys = []
    for i in range(num_chunks):
        chunk = tokens[i * chunk_size:(i + 1) * chunk_size]
        digest = hashlib.sha256(digest + chunk.tobytes()).digest()
        keys.append(digest.hex())
    return keys


def ngram_key(fingerprint: str, context: Sequence[int]) -> str:
    """Hex key of one n-gram context (1..8 tokens) in the table of `fingerprint`."""
    fp = fingerprint.encode()
    tokens = np.asarray(context, dtype="<i8")  # [n] fixed byte layout
    return hashlib.sha256(NGRAM_TAG + len(fp).to_bytes(4, "little") + fp +
                          tokens.tobytes()).hexdigest()


def is_key(text: str) -> bool:
    """Whether `text` looks like a key made here (64 lowercase hex digits)."""
    return len(text) == KEY_HEX_LEN and all(c in "0123456789abcdef" for c in text)


@dataclass(frozen=True)
class ResultKeyFields:
    """Everything that decides a generation's output (the result-cache key)."""

    draft_fingerprint: str  # "" when speculation is off
    target_fingerprint: str
    prompt_token_ids: tuple[int, ...]
    temperature: float  # 0 = greedy
    top_p: float  # 1.0 = no cut
    top_k: int  # 0 = no cut
    seed: int | None  # None only when greedy
    max_new_tokens: int
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    extra: str = ""  # other output-deciding settings, canonical text chosen by the caller

    @property
    def deterministic(self) -> bool:
        return self.temperature == 0 or self.seed is not None


def result_key(fields: ResultKeyFields) -> str:
    """Hex sha256 of the canonical msgpack of `fields`.

    Floats are packed as float32 (the wire type), so 0.7 and float32(0.7) name the same entry.
    """
    canonical = [
        RESULT_TAG, fields.draft_fingerprint, fields.target_fingerprint,
        [int(t) for t in fields.prompt_token_ids], float(fields.temperature),
        float(fields.top_p), int(fields.top_k),
        None if fields.seed is None else int(fields.seed), int(fields.max_new_tokens),
        list(fields.stop), bool(fields.ignore_eos), fields.extra,
    ]
    packed = msgpack.packb(canonical, use_single_float=True)
    return hashlib.sha256(packed).hexdigest()
