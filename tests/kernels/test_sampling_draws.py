"""Exact tests of kernels.sampling's seeded draws on tiny tensors: determinism, sampling with
and without replacement, top-k children."""

from __future__ import annotations

import math

import pytest
import torch

from specmesh.kernels.sampling import (
    sample,
    sample_without_replacement,
    top_k_children,
    tree_rejection_sample,
)
from specmesh.kernels.tree import compile_tree


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- determinism


def random_case(vocab: int = 6):
    tree = compile_tree([0, 1, 2, 3, 4, 5], [-1, -1, -1, 0, 0, 3])
    g = gen(11)
    target = torch.softmax(torch.randn(7, vocab, generator=g), -1)  # [7, V]
    draft = torch.softmax(torch.randn(7, vocab, generator=g), -1)  # [7, V]
    return tree, target, draft


def test_same_seed_same_result():
    tree, target, draft = random_case()
    for seed in range(20):
        g1, g2 = gen(seed), gen(seed)
        runs1 = [tree_rejection_sample(tree, target, draft, g1) for _ in range(5)]
        runs2 = [tree_rejection_sample(tree, target, draft, g2) for _ in range(5)]
        assert runs1 == runs2
    probs = torch.softmax(torch.randn(3, 8, generator=gen(1)), -1)  # [3, 8]
    assert torch.equal(sample(probs, gen(3)), sample(probs, gen(3)))
    assert torch.equal(sample_without_replacement(probs[0], 4, gen(3)),
                       sample_without_replacement(probs[0], 4, gen(3)))


def test_different_seeds_differ():
    tree, target, draft = random_case()
    results = {(tuple(a.accepted_nodes), a.next_token)
               for a in (tree_rejection_sample(tree, target, draft, gen(s)) for s in range(200))}
    assert len(results) > 5
    probs = torch.full((8,), 1 / 8)  # [8]
    draws = {tuple(sample_without_replacement(probs, 3, gen(s)).tolist()) for s in range(50)}
    assert len(draws) > 20


# ---------------------------------------------------------------- sample / without replacement


def test_sample_never_picks_zero_probability_tokens():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0, 2.0]])  # [2, 5]
    g = gen(7)
    for _ in range(200):
        got = sample(probs, g)  # [2]
        assert int(got[0]) in (1, 3) and int(got[1]) == 4


def test_sample_distribution():
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4]]).expand(20000, 4)  # [20000, 4]
    freq = torch.bincount(sample(probs, gen(8)), minlength=4) / 20000  # [4]
    assert (freq - probs[0]).abs().max() < 0.015


def test_sample_errors():
    with pytest.raises(ValueError, match="probs"):
        sample(torch.zeros(4), gen(0))
    with pytest.raises(ValueError, match="mass"):
        sample(torch.zeros(2, 4), gen(0))


def test_without_replacement_support_and_uniqueness():
    probs = torch.tensor([0.0, 0.6, 0.0, 0.3, 0.1, 0.0])  # [6]
    g = gen(9)
    for _ in range(200):
        got = sample_without_replacement(probs, 5, g).tolist()
        assert len(got) == 3 and len(set(got)) == 3 and set(got) == {1, 3, 4}
    assert sample_without_replacement(probs, 2, g).shape == (2,)
    assert sample_without_replacement(probs, 0, g).shape == (0,)
    with pytest.raises(ValueError, match="k"):
        sample_without_replacement(probs, -1, g)


def test_without_replacement_matches_sequential_draws():
    probs = torch.tensor([0.05, 0.4, 0.25, 0.2, 0.1])  # [5]
    g = gen(10)
    num = 20000
    counts = torch.zeros(5, 5)
    for _ in range(num):
        a, b = sample_without_replacement(probs, 2, g).tolist()
        counts[a, b] += 1
    want = probs[:, None] * probs[None, :] / (1 - probs[:, None])  # [5, 5] P(a) P(b | a removed)
    want.fill_diagonal_(0.0)
    assert (counts / num - want).abs().sum() / 2 < 0.02


def test_top_k_children_is_deterministic_and_limited_to_support():
    probs = torch.tensor([0.1, 0.3, 0.0, 0.3, 0.3, 0.0])  # [6]
    ids, top = top_k_children(probs, 3)
    assert ids.tolist() == [1, 3, 4] and top.tolist() == pytest.approx([0.3, 0.3, 0.3])
    ids, top = top_k_children(probs, 10)
    assert ids.tolist() == [1, 3, 4, 0]
    assert math.isclose(float(top.sum()), 1.0, rel_tol=1e-6)
