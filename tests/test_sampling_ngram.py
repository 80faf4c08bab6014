"""N-gram drafting stays lossless under sampling: its proposals are fixed candidates (a point-mass
draft distribution), so the first two tokens follow the target's distribution as computed by HF
transformers. A prompt that repeats itself makes the drafter propose a tree at once. CI runs
4,000 samples; the `slow` run 20,000 with the tight bounds of test_sampling_lossless."""

from __future__ import annotations

from collections import Counter

import pytest

from specmesh.clients.tokenizer import TextCodec
from specmesh.draft_service.engine import ProposeItem
from specmesh.draft_service.ngram_engine import NgramDrafter
from specmesh.wire.tree_spec import TreeSpec
from tests.conftest import TINY_TARGET
from tests.test_sampling_lossless import (
    check,
    hf_target_pairs,
    one_thread,  # noqa: F401 - the autouse fixture
    sample_pairs,
)

pytestmark = pytest.mark.models
TEXT = "One day, a girl saw a cat. One day, a boy saw a dog. One day, a"


@pytest.fixture(scope="module")
def prompt(models) -> list[int]:
    return TextCodec(models / TINY_TARGET).encode(TEXT)


def run(models, prompt, num_samples: int, max_tv: float, min_p: float):
    drafter = NgramDrafter()
    tree = drafter.propose(ProposeItem("probe", 0, prompt, TreeSpec.parse("ngram:8")))
    assert len(tree.tokens) >= 3 and tree.parents.count(-1) >= 2, "want a tree, not a chain"
    drafter.release(["probe"])
    pairs, after_rejection = sample_pairs(models, TreeSpec.parse("ngram:8"), drafter, prompt,
                                          num_samples)
    expected = hf_target_pairs(models / TINY_TARGET, prompt)
    p_value, tv, unexpected = check(pairs, expected)
    assert not unexpected, f"tokens outside the target's support: {unexpected[:5]}"
    assert p_value > min_p and tv < max_tv, (p_value, tv)
    firsts = Counter(a for a, _ in pairs)
    assert set(firsts) & set(tree.tokens[i] for i, p in enumerate(tree.parents) if p == -1)
    return after_rejection


def test_ngram_drafting_keeps_the_target_distribution(models, prompt):
    run(models, prompt, 4_000, max_tv=0.06, min_p=0.001)


@pytest.mark.slow
def test_ngram_drafting_keeps_the_target_distribution_long(models, prompt):
    run(models, prompt, 20_000, max_tv=0.03, min_p=0.01)
