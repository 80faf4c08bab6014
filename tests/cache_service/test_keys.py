"""Prefix-chunk keys: stable across prefixes, salted by the model, exactly chunk-aligned."""

from __future__ import annotations

import pytest

from specmesh.cache_service.keys import ResultKeyFields, chunk_keys, is_key, result_key

FP = "fingerprint-a"
CHUNK = 4


def test_prefix_stability():
    tokens = list(range(100, 123))  # 23 tokens: 5 full chunks + 3
    long_keys = chunk_keys(FP, tokens, CHUNK)
    assert len(long_keys) == 5
    for n in range(len(tokens) + 1):
        assert chunk_keys(FP, tokens[:n], CHUNK) == long_keys[:n // CHUNK]
    assert len(set(long_keys)) == len(long_keys)
    assert all(is_key(k) for k in long_keys)


def test_keys_name_the_whole_prefix():
    a = chunk_keys(FP, [1, 2, 3, 4, 5, 6, 7, 8], CHUNK)
    b = chunk_keys(FP, [9, 2, 3, 4, 5, 6, 7, 8], CHUNK)
    assert a[0] != b[0]
    assert a[1] != b[1]  # same second chunk, different history


def test_salt_isolation():
    tokens = list(range(16))
    a, b = chunk_keys("model-a", tokens, CHUNK), chunk_keys("model-b", tokens, CHUNK)
    assert len(a) == 4 and set(a).isdisjoint(b)
    # chunk size is part of the salt too
    assert chunk_keys(FP, tokens, 8)[0] != chunk_keys(FP, tokens, 4)[1]


def test_chunk_alignment_exact():
    assert chunk_keys(FP, [], CHUNK) == []
    for n in range(CHUNK):
        assert chunk_keys(FP, list(range(n)), CHUNK) == []
    one = chunk_keys(FP, list(range(CHUNK)), CHUNK)
    assert len(one) == 1
    for extra in range(1, CHUNK):  # a trailing partial chunk is ignored
        assert chunk_keys(FP, list(range(CHUNK + extra)), CHUNK) == one
    assert len(chunk_keys(FP, list(range(2 * CHUNK)), CHUNK)) == 2


def test_tokens_of_any_int_type_hash_alike():
    import numpy as np

    tokens = [5, 6, 7, 8]
    assert chunk_keys(FP, tokens, CHUNK) == chunk_keys(FP, np.array(tokens, np.int32), CHUNK)


def test_bad_chunk_size():
    with pytest.raises(ValueError):
        chunk_keys(FP, [1, 2], 0)


def _fields(**kw) -> ResultKeyFields:
    base = dict(draft_fingerprint="d", target_fingerprint="t", prompt_token_ids=(1, 2, 3),
                temperature=0.0, top_p=1.0, top_k=0, seed=None, max_new_tokens=16)
    return ResultKeyFields(**{**base, **kw})


def test_result_key_covers_every_field():
    base = result_key(_fields())
    assert result_key(_fields()) == base
    changes = [dict(draft_fingerprint="d2"), dict(target_fingerprint="t2"),
               dict(prompt_token_ids=(1, 2, 4)), dict(temperature=0.5, seed=1),
               dict(top_p=0.9), dict(top_k=5), dict(seed=7), dict(max_new_tokens=17),
               dict(stop=("x",)), dict(ignore_eos=True), dict(extra="tree=chain4")]
    keys = {result_key(_fields(**c)) for c in changes}
    assert base not in keys and len(keys) == len(changes)


def test_result_key_float32_canonical():
    import numpy as np

    assert result_key(_fields(temperature=0.7, seed=1)) == \
        result_key(_fields(temperature=float(np.float32(0.7)), seed=1))
