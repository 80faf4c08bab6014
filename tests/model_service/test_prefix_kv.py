"""Prefix KV round trip for both models: a sequence seeded from exported chunks gives the same
logits and the same greedy tokens as one prefilled from scratch; bad chunks are never loaded."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from specmesh.kernels import load_model
from specmesh.kernels.runner import ForwardItem, ModelRunner
from specmesh.model_service.config import EngineConfig
from specmesh.model_service.prefix_kv import export_prefix, num_prefix_tokens, seed_prefix
from specmesh.model_service.sequences import SequenceStore
from tests.conftest import TINY_DRAFT, TINY_TARGET

pytestmark = pytest.mark.models
CHUNK = 16


class Model:
    def __init__(self, path):
        self.loaded = load_model(path)
        self.store = SequenceStore.for_model(self.loaded, EngineConfig(kv_cache_mb=8, block_size=8))
        self.runner = ModelRunner(self.loaded, self.store.kv)

    def prefill(self, seq: str, tokens: list[int], chunks=()) -> tuple[torch.Tensor, int]:
        """Logits after the prompt [vocab] and the positions that came from `chunks`."""
        step = seed_prefix(self.store, self.store.sync(seq, 0, tokens), chunks, set())
        assert self.store.reserve(seq, len(tokens), {seq}) is None
        out = self.runner.forward([ForwardItem(seq, step.new_tokens)])[0]
        self.store.commit(seq, step.new_tokens)
        return out.logits[0], step.num_cached

    def greedy(self, seq: str, logits: torch.Tensor, n: int) -> tuple[list[int], torch.Tensor]:
        """n greedy tokens from `logits` on; also every step's logits [n, vocab]."""
        tokens, rows = [], []
        for _ in range(n):
            rows.append(logits)
            tokens.append(int(logits.argmax()))
            assert self.store.reserve(seq, self.store.kv.num_tokens(seq) + 1, {seq}) is None
            logits = self.runner.forward([ForwardItem(seq, tokens[-1:])])[0].logits[0]
            self.store.commit(seq, tokens[-1:])
        return tokens, torch.stack(rows)


@pytest.fixture(scope="module", params=[TINY_TARGET, TINY_DRAFT])
def model(request, models):
    return Model(models / request.param)


def _prompt(n: int, seed: int = 0) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return [1] + torch.randint(3, 512, (n - 1,), generator=gen).tolist()


@pytest.mark.parametrize("num_tokens, num_chunks_used", [(53, 3), (53, 1), (48, 3)])
def test_seeded_sequence_matches_prefill(model, num_tokens, num_chunks_used):
    prompt = _prompt(num_tokens)
    ref_logits, _ = model.prefill("ref", prompt)
    chunks = export_prefix(model.store, "ref", prompt, CHUNK, 0, num_tokens // CHUNK)
    assert len(chunks) == num_tokens // CHUNK
    assert all(c.shape[2] == CHUNK for c in chunks)
    ref_tokens, ref_rows = model.greedy("ref", ref_logits, 12)

    logits, seeded = model.prefill("hit", prompt, chunks[:num_chunks_used])
    # a fully cached prompt still runs its last token
    assert seeded == min(num_chunks_used * CHUNK, num_tokens - 1)
    assert model.store.tokens("hit") == prompt
    tokens, rows = model.greedy("hit", logits, 12)
    torch.testing.assert_close(rows, ref_rows, atol=1e-4, rtol=1e-4)
    assert tokens == ref_tokens
    model.store.release(["ref", "hit"])


def test_foreign_chunks_are_never_loaded(model):
    prompt = _prompt(40, seed=1)
    ref_logits, _ = model.prefill("ref", prompt)
    good = export_prefix(model.store, "ref", prompt, CHUNK, 0, 2)
    bad = [
        [c[:, :, :, :, :-1] for c in good],  # other head_dim
        [c.astype(np.float16) for c in good],  # other dtype
        [c[:-1] for c in good],  # other number of layers
        [np.zeros((4, 4), np.float32)],  # not KV at all
    ]
    for i, chunks in enumerate(bad):
        logits, seeded = model.prefill(f"bad{i}", prompt, chunks)
        assert seeded == 0 and model.store.tokens(f"bad{i}") == prompt
        torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    model.store.release(["ref"] + [f"bad{i}" for i in range(len(bad))])


def test_export_only_while_the_sequence_holds_the_tokens(model):
    prompt = _prompt(40, seed=2)
    model.prefill("s", prompt)
    assert len(export_prefix(model.store, "s", prompt, CHUNK, 1, 2)) == 1
    assert export_prefix(model.store, "s", [0] + prompt[1:], CHUNK, 0, 2) == []  # other tokens
    assert export_prefix(model.store, "s", prompt, CHUNK, 2, 2) == []  # nothing asked
    model.store.sync("s", 20, prompt[20:21])  # truncated below the second chunk's end
    assert export_prefix(model.store, "s", prompt, CHUNK, 0, 2) == []
    model.store.release(["s"])
    assert export_prefix(model.store, "s", prompt, CHUNK, 0, 1) == []  # released


def test_num_prefix_tokens_keeps_the_last_token():
    chunk = np.zeros((2, 2, CHUNK, 1, 4), np.float32)
    assert num_prefix_tokens((), 10) == 0
    assert num_prefix_tokens((chunk,), 40) == CHUNK
    assert num_prefix_tokens((chunk, chunk), 32) == 31
    assert num_prefix_tokens((np.zeros(3),), 40) == 0
