"""draft_service.draft_sampling: numpy twins of the torch warp and draws the draft used."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from specmesh.draft_service import draft_sampling
from specmesh.draft_service.tree_builder import draft_distribution
from specmesh.kernels.sampling import (
    SamplingConfig,
    sample_without_replacement,
    warp_logits_to_probs,
)

CONFIGS = [SamplingConfig(0.8, 0.95), SamplingConfig(1.0, 1.0), SamplingConfig(0.7, 0.5, 20),
           SamplingConfig(1.3, 1.0, 3), SamplingConfig(0.05, 0.9)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_warp_matches_the_torch_warpers(cfg):
    logits = torch.randn(6, 512, generator=torch.Generator().manual_seed(1)) * 4  # [6, 512]
    want = warp_logits_to_probs(logits, cfg)
    got = draft_sampling.warp(logits.numpy(), cfg)
    assert got.dtype == np.float32 and got.shape == (6, 512)
    assert np.array_equal(got > 0, (want > 0).numpy())  # the same support (top-k, top-p)
    np.testing.assert_allclose(got, want.numpy(), atol=2e-7, rtol=2e-5)


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_draft_probs_is_the_fp16_distribution_sent(cfg):
    logits = torch.randn(3, 300, generator=torch.Generator().manual_seed(2)) * 3
    q = draft_sampling.draft_probs(logits.numpy(), cfg)
    np.testing.assert_allclose(q.sum(-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(q, draft_distribution(logits, cfg).numpy(), atol=1e-6)


@pytest.mark.parametrize("k", [1, 2, 5, 40])
def test_race_draws_what_sample_without_replacement_draws(k):
    probs = torch.softmax(torch.randn(64, generator=torch.Generator().manual_seed(3)) * 2, -1)
    probs[probs < 0.005] = 0  # a support smaller than some k
    for seed in range(20):
        want = sample_without_replacement(probs, k, torch.Generator().manual_seed(seed))
        got = draft_sampling.race(probs.numpy(), k, torch.Generator().manual_seed(seed))
        assert got.tolist() == want.tolist()
        assert len(set(got.tolist())) == len(got) and all(probs[got] > 0)


def test_race_frequencies_follow_q():
    """One draw: token v about q_v of the time (4000 draws, 4-sigma bounds)."""
    q = np.array([0.5, 0.3, 0.15, 0.05, 0.0], dtype=np.float32)
    gen = torch.Generator().manual_seed(7)
    counts = np.bincount([int(draft_sampling.race(q, 1, gen)[0]) for _ in range(4000)],
                         minlength=5)
    sigma = np.sqrt(4000 * q * (1 - q))
    assert np.all(np.abs(counts - 4000 * q) <= 4 * sigma + 1e-9)
    assert counts[4] == 0
