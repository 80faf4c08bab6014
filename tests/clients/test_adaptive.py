"""Adaptive speculation: the expected-tokens formula, cost fits, and exact k choices."""

from __future__ import annotations

import pytest

from specmesh.clients.adaptive import (
    AdaptiveConfig,
    AdaptiveSpeculation,
    LinearCost,
    expected_tokens,
)


def policy(**kw) -> AdaptiveSpeculation:
    kw.setdefault("explore_every", 0)
    return AdaptiveSpeculation(AdaptiveConfig(**kw))


def measured(verify_base=0.010, verify_per_token=0.0, draft_per_depth=0.001, **kw):
    """A policy with exact linear costs already measured."""
    p = policy(**kw)
    for tokens in (1, 100, 1000):
        p.observe_verify(tokens, verify_base + verify_per_token * tokens)
    for depth in (1, 4):
        p.observe_draft(depth, draft_per_depth * depth)
    return p


def test_expected_tokens_per_round():
    assert expected_tokens(0, 0.7) == 1.0  # plain decode: the bonus token only
    assert expected_tokens(5, 0.0) == 1.0
    assert expected_tokens(4, 1.0) == 5.0
    assert expected_tokens(3, 0.5) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    assert expected_tokens(2, 0.9) == pytest.approx(1 + 0.9 + 0.81)


def test_linear_cost_recovers_a_line_and_falls_back_without_spread():
    line = LinearCost(decay=0.5)
    assert line.predict(10) is None
    for x in (1, 2, 8, 3):
        line.observe(x, 0.5 + 0.25 * x)
    assert line.coefficients() == pytest.approx((0.5, 0.25))
    assert line.predict(100) == pytest.approx(25.5)

    flat = LinearCost(decay=0.5, fallback="constant")
    flat.observe(16, 0.02)
    assert flat.coefficients() == pytest.approx((0.02, 0.0))
    prop = LinearCost(decay=0.5, fallback="proportional")
    prop.observe(4, 0.02)
    assert prop.coefficients() == pytest.approx((0.0, 0.005))

    falling = LinearCost(decay=0.5)  # noise: more x, less time -> treated as flat
    falling.observe(1, 0.03)
    falling.observe(9, 0.01)
    assert falling.coefficients()[1] == 0.0


def test_acceptance_is_the_ewma_of_accepted_over_tested_positions():
    p = policy(prior_acceptance=0.5, acceptance_decay=0.5)
    assert p.acceptance("s") == 0.5
    p.observe_round("s", depth=4, num_accepted=4)  # 4 of 4 tested: (0.25+2) / (0.5+2)
    assert p.acceptance("s") == pytest.approx(2.25 / 2.5)
    p.observe_round("s", depth=4, num_accepted=1)  # 1 accepted, 2 tested
    assert p.acceptance("s") == pytest.approx((1.125 + 0.5) / (1.25 + 1.0))
    p.observe_round("s", depth=0, num_accepted=0)  # no draft: no information
    assert p.acceptance("s") == pytest.approx(1.625 / 2.25)


def test_new_sequences_start_from_the_global_acceptance():
    p = policy(prior_acceptance=0.5, acceptance_decay=1.0)
    p.observe_round("a", depth=4, num_accepted=3)  # 3 of 4 tested
    assert p.acceptance("a") == pytest.approx(0.75)
    assert p.acceptance("b") == pytest.approx(0.75)
    p.forget("a")
    p.observe_round("b", depth=2, num_accepted=0)
    assert p.acceptance("b") == 0.0


def test_initial_k_until_costs_are_measured():
    p = policy(initial_k=3)
    assert p.choose("s", batch_tokens=1) == 3
    p.observe_verify(1, 0.01)
    assert p.choose("s", batch_tokens=1) == 3  # draft time still unknown
    assert policy(initial_k=5, k_max=2).choose("s", 1) == 2


def test_cheap_draft_high_acceptance_picks_the_best_k():
    # verify flat 10 ms, draft 1 ms per depth, a = 0.9:
    # rate(k) = (1 - 0.9^(k+1)) / 0.1 / (10 + k) ms: k = 8 gives 6.13 / 18 = 0.341 per ms,
    # k = 7 gives 5.70 / 17 = 0.335, plain decode 0.1.
    p = measured(prior_acceptance=0.9, k_max=8)
    assert p.choose("s", batch_tokens=1) == 8
    # with a cap of 4 the best is the cap
    assert measured(prior_acceptance=0.9, k_max=4).choose("s", batch_tokens=1) == 4


def test_low_acceptance_turns_speculation_off():
    # a = 0.05: k = 1 gives 1.05 tokens in 11 ms < 1 token in 10 ms
    p = measured(prior_acceptance=0.05)
    assert p.choose("s", batch_tokens=1) == 0
    rates = [p.tokens_per_second("s", k, 1) for k in range(3)]
    assert rates[0] == pytest.approx(100.0)
    assert rates[1] == pytest.approx(1.05 / 0.011)


def test_min_speedup_demands_a_margin():
    # a = 0.5, draft 1 ms, verify 10 ms: k = 1 is 1.5 / 11 ms = 136/s vs 100/s, k = 2 is
    # 1.75 / 12 ms = 146/s, k = 3 is 1.875 / 13 ms = 144/s
    assert measured(prior_acceptance=0.5, min_speedup=1.0).choose("s", 1) == 2
    assert measured(prior_acceptance=0.5, min_speedup=1.5).choose("s", 1) == 0


def batched(prior_acceptance=0.8, **kw) -> AdaptiveSpeculation:
    """verify = 10 ms + 0.1 ms per token; the draft 1 ms a call + 0.05 ms per row (B sequences
    at depth k: B * k rows)."""
    p = policy(prior_acceptance=prior_acceptance, **kw)
    for tokens in (1, 100):
        p.observe_verify(tokens, 0.010 + 0.0001 * tokens)
    for rows in (1, 512):
        p.observe_draft(1, 0.001 + 0.00005 * rows, rows=rows)
    return p


def test_load_shrinks_k_down_to_zero():
    # a = 0.8; the whole batch drafts
    p = batched(k_max=8)
    ks = [p.best_depth("s", batch_tokens=n, batch_size=n) for n in (1, 8, 32, 64, 256)]
    assert ks == [8, 6, 3, 1, 0]
    steep = measured(prior_acceptance=0.8, verify_per_token=0.001, k_max=8)
    assert steep.best_depth("s", batch_tokens=64, batch_size=64) == 0


def test_the_draft_costs_its_rows_so_a_batch_drafts_less_than_one_sequence():
    """Learnt at one sequence only (1 ms a depth, so 1 ms a row), a batch of 8 drafting k
    would cost 8k ms: nothing pays; one sequence still drafts."""
    p = measured(prior_acceptance=0.8)
    assert p.best_depth("s", batch_tokens=1, batch_size=1) > 0
    assert p.best_depth("s", batch_tokens=8, batch_size=8) == 0
    assert p.tokens_per_second("s", 2, 8, 8) == pytest.approx(
        expected_tokens(2, 0.8) / (0.016 + 0.010))


def test_a_draft_that_fell_behind_catches_up_only_where_it_pays():
    """A sequence that decoded without drafting must feed its draft the missed tokens first:
    once, beside the round's rows. Here 1 ms a row: 100 missed tokens cost 99 ms more, which
    100 tokens left repay (~0.6 s saved at ~6 ms a token) and 10 do not (~0.06 s)."""
    p = measured(prior_acceptance=0.8)
    k = p.best_depth("s", 1)
    assert k > 0
    assert p.choose("s", 1, draft_lag=100, tokens_left=100) == k
    assert p.choose("s", 1, draft_lag=100, tokens_left=10) == 0
    assert p.choose("s", 1, draft_lag=1, tokens_left=1) == k  # the steady state: no catch-up
    plain, spec = (p.tokens_per_second("s", d, 1) for d in (0, k))
    saved_per_token = 1 / plain - 1 / spec
    assert p.catch_up_pays("s", k, 1, 1, 100, int(0.099 / saved_per_token) + 1)
    assert not p.catch_up_pays("s", k, 1, 1, 100, int(0.099 / saved_per_token) - 1)


def test_exploration_backs_off_while_it_finds_nothing():
    p = measured(prior_acceptance=0.05, explore_every=2)
    # explores after 2 rounds at 0, then 4, then 8 (doubling, at most 16x explore_every)
    assert [p.choose("s", 1) for _ in range(14)] == [0, 1, 0, 0, 0, 1] + [0] * 7 + [1]
    # a good round brings acceptance (and k) back up
    for _ in range(30):
        p.observe_round("s", depth=1, num_accepted=1)
    assert p.choose("s", 1) > 0
    assert p._seqs["s"].explore_gap == 2  # drafting again: the next fall starts from 2 rounds


def test_exploration_drafts_at_the_depth_rated_best_not_at_one():
    """A draft call with a large fixed cost (a GPU's: the round trip and the first forward)
    makes depth 1 the worst depth to try; the explored round drafts where the model rates
    drafting best: 1.75 / (2 + 4 + 4) ms beats 1.5 / 9 and 1.875 / 11 at acceptance 0.5."""
    p = policy(prior_acceptance=0.5, explore_every=2)
    for tokens in (1, 100):  # 4 ms whatever the batch
        p.observe_verify(tokens, 0.004)
    for depth, seconds in ((1, 0.005), (4, 0.008)):  # 4 ms per call + 1 ms per depth
        p.observe_draft(depth, seconds)
    assert p.best_depth("s", 1) == 0  # plain decoding: 1 / 4 ms beats every depth
    assert [p.choose("s", 1) for _ in range(6)] == [0, 2, 0, 0, 0, 2]


def test_tree_width_scales_budgets_and_verify_cost():
    p = measured(prior_acceptance=0.9, k_max=8, tree_width=4)
    nodes = p.choose("s", batch_tokens=1)
    assert nodes % 4 == 0 and nodes > 0
    assert p.depth(nodes) == nodes // 4
    assert p.depth(5) == 2
    # at depth k the verify batch holds 4k draft tokens, so the rate matches a 4x batch at k
    chain = measured(prior_acceptance=0.9)
    assert p.tokens_per_second("s", 3, 1) == pytest.approx(
        expected_tokens(3, 0.9) / (0.003 + 0.010))
    assert chain.tokens_per_second("s", 3, 1) == p.tokens_per_second("s", 3, 1)


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="k_max"):
        AdaptiveConfig(k_max=-1)
    with pytest.raises(ValueError, match="tree_width"):
        AdaptiveConfig(tree_width=0)
    with pytest.raises(ValueError, match="acceptance_decay"):
        AdaptiveConfig(acceptance_decay=0)
    with pytest.raises(ValueError, match="fallback"):
        LinearCost(0.5, fallback="quadratic")


def test_observe_after_forget_keeps_no_state():
    p = measured(prior_acceptance=0.8)
    p.choose("s", 1)
    p.forget("s")
    p.observe_round("s", depth=4, num_accepted=2)  # a late reply for a finished sequence
    assert "s" not in p._seqs


def test_a_batch_depth_is_computed_once_per_round_and_follows_new_measurements():
    p = batched()
    first = p.best_depth("a", 16, 16)
    assert first == p.best_depth("b", 16, 16) == p._best_depth("a", 16, 16) > 0
    assert list(p._batch_depth) == [(16, 16)]  # one computation for the round's sequences
    for tokens in (16, 200, 2000):  # verifying got far more expensive per token
        p.observe_verify(tokens, 0.010 + 0.01 * tokens)
    assert not p._batch_depth  # dropped by the measurement
    assert p.best_depth("a", 16, 16) == p._best_depth("a", 16, 16) < first
