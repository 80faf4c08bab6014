"""The draft engine seeded from cached prefix chunks proposes the same trees (greedy and seeded
sampling) as one that prefilled the whole prompt."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from specmesh.draft_service.engine import DraftEngine, ProposeItem
from specmesh.kernels import load_model
from specmesh.kernels.sampling import SamplingConfig
from specmesh.model_service.config import EngineConfig
from specmesh.wire.tree_spec import TreeSpec
from tests.conftest import TINY_DRAFT

pytestmark = pytest.mark.models
CHUNK = 16


@pytest.fixture(scope="module")
def engine(models):
    return DraftEngine(load_model(models / TINY_DRAFT), EngineConfig(kv_cache_mb=8))


@pytest.mark.parametrize("sampling, seed", [(SamplingConfig(), None),
                                            (SamplingConfig(temperature=0.8, top_p=0.9), 7)])
@pytest.mark.parametrize("num_tokens", [45, 48])
def test_seeded_prefix_proposes_the_same_tree(engine, sampling, seed, num_tokens):
    gen = torch.Generator().manual_seed(num_tokens)
    prompt = [1] + torch.randint(3, 512, (num_tokens - 1,), generator=gen).tolist()
    spec = TreeSpec.parse("static:3,2")
    ref = engine.propose_batch([ProposeItem("ref", 0, prompt, spec, sampling, seed)])[0]
    chunks = tuple(engine.export_prefix("ref", prompt, CHUNK, 0, num_tokens // CHUNK))
    assert len(chunks) == num_tokens // CHUNK
    got = engine.propose_batch([ProposeItem("hit", 0, prompt, spec, sampling, seed,
                                            prefix_chunks=chunks)])[0]
    assert (got.tokens, got.parents) == (ref.tokens, ref.parents)
    assert got.num_cached_tokens == ref.num_cached_tokens == num_tokens
    for a, b in zip(got.draft_dists, ref.draft_dists):
        if a is None:
            assert b is None
        else:
            np.testing.assert_array_equal(a[0], b[0])
            np.testing.assert_allclose(a[1].astype(np.float32), b[1].astype(np.float32),
                                       atol=2e-3)
    assert engine.sequences.tokens("hit") == prompt
    engine.release(["ref", "hit"])
