"""The fleet n-gram table's request checks and counting (pure; no Redis, no gRPC).

A PutNgrams request names a stretch of one sequence; every continuation starting at a position
in [first_position, end_position) is counted once per distinct (context, continuation) pair,
after each of its contexts of min_n..max_n tokens:

    pairs = ngram_pairs([5, 6, 7, 5, 6, 8], first=2, end=0, min_n=1, max_n=2, max_depth=2)
    # {(6,): {(7, 5), (8,)}, (5, 6): {(7, 5), (8,)}, (7,): {(5, 6)}, (6, 7): {(5, 6)},
    #  (5,): {(6, 8)}, (7, 5): {(6, 8)}}

Continuations are stored as msgpack lists of ints (never pickle).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import msgpack

from specmesh.wire.errors import InvalidRequest

MAX_NGRAM_N = 8  # longest context
MAX_NGRAM_DEPTH = 16  # longest continuation
MAX_PUT_TOKENS = 1 << 14  # token_ids of one PutNgrams
MAX_PUT_NGRAMS = 8192  # positions x context lengths of one PutNgrams
MAX_GET_CONTEXTS = 512  # contexts of one GetNgrams
MAX_TOKEN_ID = (1 << 31) - 1


@dataclass(frozen=True)
class NgramPut:
    """A checked PutNgrams request."""

    token_ids: tuple[int, ...]
    first: int  # first continuation start counted
    end: int  # one past the last continuation start counted
    min_n: int
    max_n: int
    max_depth: int


def check_put(token_ids: Sequence[int], first: int, end: int, min_n: int, max_n: int,
              max_depth: int) -> NgramPut:
    """Validate a PutNgrams request (field names as in cache.proto); end 0 = len(token_ids)."""
    if len(token_ids) > MAX_PUT_TOKENS:
        raise InvalidRequest("token_ids", f"{len(token_ids)} tokens, more than {MAX_PUT_TOKENS}")
    if token_ids and not 0 <= min(token_ids) <= max(token_ids) <= MAX_TOKEN_ID:
        raise InvalidRequest("token_ids", "token ids must be non-negative")
    if not 1 <= min_n <= max_n:
        raise InvalidRequest("min_n", f"need 1 <= min_n ({min_n}) <= max_n ({max_n})")
    if max_n > MAX_NGRAM_N:
        raise InvalidRequest("max_n", f"{max_n} is more than {MAX_NGRAM_N}")
    if not 1 <= max_depth <= MAX_NGRAM_DEPTH:
        raise InvalidRequest("max_depth", f"{max_depth} not in [1, {MAX_NGRAM_DEPTH}]")
    end = end or len(token_ids)
    if not 0 <= end <= len(token_ids):
        raise InvalidRequest("end_position", f"{end} not in [0, {len(token_ids)}]")
    if not 0 <= first <= end:
        raise InvalidRequest("first_position", f"{first} not in [0, end_position ({end})]")
    num = (end - first) * (max_n - min_n + 1)
    if num > MAX_PUT_NGRAMS:
        raise InvalidRequest("token_ids", f"{end - first} positions x {max_n - min_n + 1} "
                             f"context lengths = {num} n-grams, more than {MAX_PUT_NGRAMS}")
    return NgramPut(tuple(int(t) for t in token_ids), first, end, min_n, max_n, max_depth)


def check_contexts(contexts: Sequence[Sequence[int]], top: int, cap: int) -> int:
    """Validate a GetNgrams request; the continuations to return per context."""
    if len(contexts) > MAX_GET_CONTEXTS:
        raise InvalidRequest("contexts", f"{len(contexts)} contexts, more than {MAX_GET_CONTEXTS}")
    for i, context in enumerate(contexts):
        if not 1 <= len(context) <= MAX_NGRAM_N:
            raise InvalidRequest(f"contexts[{i}].token_ids", f"{len(context)} tokens, not in "
                                 f"[1, {MAX_NGRAM_N}]")
        if not 0 <= min(context) <= max(context) <= MAX_TOKEN_ID:
            raise InvalidRequest(f"contexts[{i}].token_ids", "token ids must be non-negative")
    if top < 0:
        raise InvalidRequest("max_continuations", f"{top} is negative")
    return min(top, cap) if top else cap


def ngram_pairs(put: NgramPut) -> dict[tuple[int, ...], set[tuple[int, ...]]]:
    """context -> the distinct continuations that followed it in `put`'s stretch."""
    tokens = put.token_ids
    pairs: dict[tuple[int, ...], set[tuple[int, ...]]] = {}
    for pos in range(put.first, put.end):
        cont = tokens[pos:pos + put.max_depth]
        for n in range(put.min_n, min(put.max_n, pos) + 1):
            pairs.setdefault(tokens[pos - n:pos], set()).add(cont)
    return pairs


def encode_continuation(tokens: Sequence[int]) -> bytes:
    return msgpack.packb([int(t) for t in tokens])


def decode_continuation(blob: bytes) -> tuple[int, ...] | None:
    """The tokens of a stored continuation; None if it is not a msgpack list of token ids."""
    try:
        value = msgpack.unpackb(blob, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException):
        return None
    if (not isinstance(value, list) or not 1 <= len(value) <= MAX_NGRAM_DEPTH
            or not all(type(t) is int and 0 <= t <= MAX_TOKEN_ID for t in value)):
        return None
    return tuple(value)
