"""Exact tests of kernels.sampling on tiny tensors (V = 4..8)."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from specmesh.kernels import sampling
from specmesh.kernels.sampling import (
    Acceptance,
    SamplingConfig,
    greedy_accept,
    tree_rejection_sample,
    warp_logits_to_probs,
)
from specmesh.kernels.tree import chain_tree, compile_tree


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def f64(*values: float) -> torch.Tensor:  # [len(values)]
    return torch.tensor(values, dtype=torch.float64)


def one_hot(token: int, vocab: int) -> torch.Tensor:  # [vocab]
    return torch.nn.functional.one_hot(torch.tensor(token), vocab).float()


def rows(*dists) -> torch.Tensor:  # [len(dists), V]
    return torch.stack([torch.as_tensor(d, dtype=torch.float32) for d in dists])


# ---------------------------------------------------------------- SamplingConfig


def test_config_defaults_are_greedy_and_valid():
    cfg = SamplingConfig()
    cfg.validate()
    assert cfg.greedy
    assert not SamplingConfig(temperature=0.7).greedy


@pytest.mark.parametrize("kwargs, field", [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"temperature": 1.0, "top_p": 0.0}, "top_p"),
    ({"temperature": 1.0, "top_p": 1.5}, "top_p"),
    ({"temperature": 1.0, "top_p": float("nan")}, "top_p"),
    ({"temperature": 1.0, "top_k": -1}, "top_k"),
    ({"temperature": 1.0, "top_k": 2.5}, "top_k"),
])
def test_config_validation_names_the_field(kwargs, field):
    cfg = SamplingConfig(**kwargs)
    with pytest.raises(ValueError, match=rf"^{field} "):
        cfg.validate()
    with pytest.raises(ValueError, match=rf"^{field} "):
        warp_logits_to_probs(torch.zeros(1, 4), cfg)


def test_config_edges_are_valid():
    SamplingConfig(temperature=0.0, top_p=1.0, top_k=0).validate()
    SamplingConfig(temperature=5.0, top_p=1e-6, top_k=1).validate()


# ---------------------------------------------------------------- warping vs HF


def hf_probs(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """HF's generation order: temperature, top-k, top-p, then softmax (warpers only when active)."""
    scores = logits.clone()
    if cfg.temperature != 1.0:
        scores = TemperatureLogitsWarper(cfg.temperature)(None, scores)
    if cfg.top_k > 0:
        scores = TopKLogitsWarper(cfg.top_k)(None, scores)
    if cfg.top_p < 1.0:
        scores = TopPLogitsWarper(cfg.top_p)(None, scores)
    return scores.softmax(dim=-1)


CONFIGS = [
    SamplingConfig(temperature=1.0),
    SamplingConfig(temperature=0.7),
    SamplingConfig(temperature=1.5, top_k=3),
    SamplingConfig(temperature=1.0, top_p=0.9),
    SamplingConfig(temperature=0.6, top_k=5, top_p=0.8),
    SamplingConfig(temperature=2.0, top_k=1),
    SamplingConfig(temperature=1.0, top_p=0.05),
    SamplingConfig(temperature=0.9, top_k=100, top_p=0.5),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_warp_matches_hf_on_random_logits(cfg):
    logits = torch.randn(16, 8, generator=gen(1)) * 3  # [16, 8]
    got = warp_logits_to_probs(logits, cfg)  # [N, V]
    torch.testing.assert_close(got, hf_probs(logits, cfg), rtol=0, atol=0)


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_warp_matches_hf_with_ties(cfg):
    logits = torch.randint(-2, 3, (32, 6), generator=gen(2)).float()  # [32, 6] many ties
    got = warp_logits_to_probs(logits, cfg)  # [N, V]
    torch.testing.assert_close(got, hf_probs(logits, cfg), rtol=0, atol=0)


def test_warp_top_k_keeps_ties_and_top_p_keeps_one():
    logits = torch.tensor([[3.0, 1.0, 3.0, 0.0, 1.0]])  # [1, 5]
    probs = warp_logits_to_probs(logits, SamplingConfig(temperature=1.0, top_k=1))
    torch.testing.assert_close(probs, torch.tensor([[0.5, 0.0, 0.5, 0.0, 0.0]]))
    peaked = torch.tensor([[5.0, 0.0, 0.0, 0.0]])  # [1, 4]
    probs = warp_logits_to_probs(peaked, SamplingConfig(temperature=1.0, top_p=1e-6))
    torch.testing.assert_close(probs, torch.tensor([[1.0, 0.0, 0.0, 0.0]]))


def test_warp_greedy_is_one_hot_argmax_first_on_ties():
    logits = torch.tensor([[0.1, 2.0, 2.0, -1.0], [5.0, 0.0, 0.0, 0.0]])  # [2, 4]
    probs = warp_logits_to_probs(logits, SamplingConfig(temperature=0.0, top_k=3, top_p=0.5))
    torch.testing.assert_close(probs, torch.stack([one_hot(1, 4), one_hot(0, 4)]))


def test_warp_rejects_wrong_rank():
    with pytest.raises(ValueError, match="logits"):
        warp_logits_to_probs(torch.zeros(4), SamplingConfig(temperature=1.0))


# ---------------------------------------------------------------- greedy_accept


def test_greedy_chain_full_match_gives_bonus():
    tree = chain_tree([5, 1, 2])
    acc = greedy_accept(tree, torch.tensor([5, 1, 2, 7]))
    assert acc == Acceptance(accepted_nodes=[0, 1, 2], next_token=7, is_bonus=True)
    assert acc.tokens(tree) == [5, 1, 2, 7]


def test_greedy_chain_early_mismatch_gives_recovered():
    tree = chain_tree([5, 1, 2])
    assert greedy_accept(tree, torch.tensor([5, 3, 2, 7])) == Acceptance([0], 3, False)
    assert greedy_accept(tree, torch.tensor([4, 1, 2, 7])) == Acceptance([], 4, False)


def test_greedy_empty_tree_is_a_plain_decode_step():
    tree = compile_tree([], [])
    assert greedy_accept(tree, torch.tensor([6])) == Acceptance([], 6, True)


def test_greedy_branching_takes_the_matching_branch():
    #        root
    #     0:a=1   1:b=2
    #   2:3  3:0    4:1
    #               5:4
    tree = compile_tree([1, 2, 3, 0, 1, 4], [-1, -1, 0, 0, 1, 4])
    # argmax rows: root, after 0..5
    assert greedy_accept(tree, torch.tensor([2, 0, 1, 0, 0, 4, 6])) == Acceptance([1, 4, 5], 6,
                                                                                 True)
    assert greedy_accept(tree, torch.tensor([1, 0, 1, 7, 7, 7, 7])) == Acceptance([0, 3], 7, True)
    assert greedy_accept(tree, torch.tensor([2, 0, 1, 0, 0, 5, 6])) == Acceptance([1, 4], 5, False)
    assert greedy_accept(tree, torch.tensor([2, 0, 3, 0, 0, 5, 6])) == Acceptance([1], 3, False)
    assert greedy_accept(tree, torch.tensor([1, 6, 1, 0, 0, 0, 0])) == Acceptance([0], 6, False)


def test_greedy_duplicate_siblings_take_the_deepest_path():
    tree = compile_tree([3, 3, 2], [-1, -1, 1])  # two children "3", only the second has a child
    assert greedy_accept(tree, torch.tensor([3, 0, 2, 5])) == Acceptance([1, 2], 5, True)
    assert greedy_accept(tree, torch.tensor([3, 1, 0, 5])) == Acceptance([0], 1, True)


def test_greedy_rejects_wrong_shape():
    with pytest.raises(ValueError, match="target_argmax"):
        greedy_accept(chain_tree([1, 2]), torch.tensor([1, 2]))


def random_tree_and_logits(g: torch.Generator, n: int = 8, vocab: int = 6):
    """A random tree with distinct sibling tokens, and logits whose argmax often hits a child."""
    parents = [-1] + [int(torch.randint(-1, i, (), generator=g)) for i in range(1, n)]
    tokens = [0] * n
    logits = torch.randn(1 + n, vocab, generator=g)  # [1 + n, V]
    for row in range(1 + n):
        kids = [i for i, p in enumerate(parents) if p == row - 1]
        perm = torch.randperm(vocab, generator=g).tolist()
        for i, tok in zip(kids, perm):
            tokens[i] = tok
        if kids and float(torch.rand((), generator=g)) < 0.7:
            logits[row, perm[int(torch.randint(0, len(kids), (), generator=g))]] += 10.0
    return compile_tree(tokens, parents), logits


def test_rejection_sampling_with_one_hot_target_is_greedy():
    g = gen(0)
    depths = set()
    for trial in range(100):
        tree, logits = random_tree_and_logits(g)
        target = warp_logits_to_probs(logits, SamplingConfig(temperature=0.0))  # [1 + n, V]
        draft = torch.rand(1 + tree.num_nodes, 6, generator=g)  # [1 + n, V]
        draft[:, 0] = 0.0  # children with token 0 have q = 0: fixed candidates
        got = tree_rejection_sample(tree, target, draft, gen(trial))
        assert got == greedy_accept(tree, logits.argmax(-1))
        depths.add(got.num_accepted)
    assert len(depths) >= 3


# ---------------------------------------------------------------- tree_rejection_sample, exact


def test_perfect_match_accepts_everything_plus_bonus_from_leaf_row():
    tree = chain_tree([2, 0, 3])
    target = rows(one_hot(2, 5), one_hot(0, 5), one_hot(3, 5), one_hot(1, 5))  # [4, 5]
    for seed in range(20):
        acc = tree_rejection_sample(tree, target, target.clone(), gen(seed))
        assert acc == Acceptance([0, 1, 2], 1, True)


def test_p_equal_q_never_rejects_a_drawn_child():
    tree = chain_tree([2, 0, 3])
    target = torch.softmax(torch.randn(4, 6, generator=gen(3)), -1)  # [4, 6]
    for seed in range(50):
        acc = tree_rejection_sample(tree, target, target.clone(), gen(seed))
        assert acc.accepted_nodes == [0, 1, 2] and acc.is_bonus


def test_early_mismatch_recovers_target_token():
    tree = chain_tree([2, 0, 3])
    target = rows(one_hot(2, 5), one_hot(4, 5), one_hot(3, 5), one_hot(1, 5))  # [4, 5]
    draft = rows(one_hot(2, 5), one_hot(0, 5), one_hot(3, 5), torch.zeros(5))  # [4, 5]
    for seed in range(20):
        assert tree_rejection_sample(tree, target, draft, gen(seed)) == Acceptance([0], 4, False)


def test_branching_perfect_match_in_second_child():
    tree = compile_tree([1, 2, 3], [-1, -1, 1])  # root -> {1, 2}, 2 -> 3
    target = rows(one_hot(2, 4), one_hot(0, 4), one_hot(3, 4), one_hot(0, 4))  # [4, 4]
    draft = rows([0.5, 0.5, 0.0, 0.0], torch.zeros(4), one_hot(3, 4), torch.zeros(4))  # [4, 4]
    for seed in range(20):
        assert tree_rejection_sample(tree, target, draft, gen(seed)) == Acceptance([1, 2], 0, True)


P_ALL_REJECTED = [0.0, 0.0, 0.0, 0.5, 0.3, 0.2]
Q_ALL_REJECTED = [0.4, 0.3, 0.2, 0.1, 0.0, 0.0]


def test_all_rejected_exact_residual():
    # p has no mass on the children 0, 1, 2, so each is rejected whatever the uniform. By hand:
    # reject 0: p1 = (0,0,0,.4,.3,.2)/.9, q1 = (0,.3,.2,.1,0,0)/.6
    # reject 1: p2 = (0,0,0,5/18,6/18,4/18)/(15/18) = (0,0,0,1/3,2/5,4/15), q2 = (0,0,2/3,1/3,0,0)
    # reject 2: p3 = (0,0,0,0,2/5,4/15)/(2/3) = (0,0,0,0,.6,.4)
    p = torch.tensor(P_ALL_REJECTED, dtype=torch.float64)
    q = torch.tensor(Q_ALL_REJECTED, dtype=torch.float64)
    chosen, residual = sampling._try_children(p, q, [0, 1, 2], [0.0, 0.0, 0.0])
    assert chosen is None
    torch.testing.assert_close(residual, torch.tensor([0, 0, 0, 0, 0.6, 0.4], dtype=torch.float64))


def test_all_rejected_recovered_token_follows_residual():
    tree = compile_tree([0, 1, 2], [-1, -1, -1])
    target = rows(P_ALL_REJECTED, *[torch.zeros(6)] * 3)  # [4, 6]; leaf rows never reached
    draft = rows(Q_ALL_REJECTED, *[torch.zeros(6)] * 3)  # [4, 6]
    counts = torch.zeros(6)
    g = gen(4)
    for _ in range(4000):
        acc = tree_rejection_sample(tree, target, draft, g)
        assert not acc.accepted_nodes and not acc.is_bonus
        counts[acc.next_token] += 1
    assert counts[:4].sum() == 0
    assert abs(counts[4] / 4000 - 0.6) < 0.03  # binomial sd ~ 0.008


def test_disjoint_supports_never_accept_and_recover_p():
    p = torch.tensor([0.5, 0.3, 0.2, 0.0, 0.0, 0.0], dtype=torch.float64)
    q = torch.tensor([0.0, 0.0, 0.0, 0.6, 0.3, 0.1], dtype=torch.float64)
    chosen, residual = sampling._try_children(p, q, [3, 4], [0.0, 0.0])
    assert chosen is None
    torch.testing.assert_close(residual, p)
    tree = compile_tree([3, 4], [-1, -1])
    counts = torch.zeros(6)
    g = gen(5)
    for _ in range(3000):
        acc = tree_rejection_sample(tree, rows(p, p, p), rows(q, q, q), g)
        assert not acc.accepted_nodes
        counts[acc.next_token] += 1
    assert (counts / 3000 - p.float()).abs().max() < 0.03


def test_fixed_candidate_with_zero_q_is_accepted_with_prob_p():
    # Child 2 has q = 0: it cannot have come from q, so it is a fixed candidate accepted with
    # probability p(2) = 0.3; on rejection the residual is p without token 2.
    p = torch.tensor([0.5, 0.2, 0.3, 0.0], dtype=torch.float64)
    q = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    assert sampling._try_children(p, q, [2], [0.29])[0] == 0
    chosen, residual = sampling._try_children(p, q, [2], [0.31])
    assert chosen is None
    torch.testing.assert_close(residual, f64(5 / 7, 2 / 7, 0, 0))
    # p(x) = q(x) = 0: never accepted, p unchanged
    chosen, residual = sampling._try_children(p, q, [3, 2], [0.0, 0.9])
    assert chosen is None
    torch.testing.assert_close(residual, f64(5 / 7, 2 / 7, 0, 0))


def test_zero_q_acceptance_rate_through_the_tree():
    tree = compile_tree([2], [-1])
    target = rows([0.5, 0.2, 0.3, 0.0], [0.25] * 4)  # [2, 4]
    draft = rows([0.0, 0.0, 0.0, 1.0], torch.zeros(4))  # [2, 4]
    g = gen(6)
    accepted = sum(bool(tree_rejection_sample(tree, target, draft, g).accepted_nodes)
                   for _ in range(4000))
    assert abs(accepted / 4000 - 0.3) < 0.03


def test_all_zero_draft_row_makes_children_fixed_candidates():
    p = torch.tensor([0.1, 0.6, 0.3, 0.0], dtype=torch.float64)
    q = torch.zeros(4, dtype=torch.float64)  # [4] no draft distribution
    chosen, residual = sampling._try_children(p, q, [1, 2], [0.7, 0.8])
    assert chosen is None  # 0.7 >= p(1) = 0.6; then p = (.25, 0, .75, 0) and 0.8 >= 0.75
    torch.testing.assert_close(residual, torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64))


def test_zero_residual_falls_back_to_point_mass_residual():
    # Unnormalized rows where p <= q everywhere: max(p - q, 0) is all zero, yet u * q(x) >= p(x)
    # rejects. The guard uses p without x instead of dividing by zero.
    p = torch.tensor([0.25, 0.25, 0.0, 0.0], dtype=torch.float64)
    q = torch.tensor([0.5, 0.5, 0.0, 0.0], dtype=torch.float64)
    chosen, residual = sampling._try_children(p, q, [0], [0.9])
    assert chosen is None
    torch.testing.assert_close(residual, torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64))


def test_exhausted_q_support_leaves_q_all_zero_not_nan():
    p = torch.tensor([0.2, 0.2, 0.6, 0.0], dtype=torch.float64)
    q = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    # child 0 (q = 1) is rejected with u = 0.5 (0.5 * 1 >= 0.2); child 2 then has q = 0 after the
    # update and is a fixed candidate of the residual (0, .25, .75, 0)
    chosen, residual = sampling._try_children(p, q, [0, 2], [0.5, 0.74])
    assert chosen == 1
    chosen, residual = sampling._try_children(p, q, [0, 2], [0.5, 0.76])
    assert chosen is None
    torch.testing.assert_close(residual, torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64))


def test_unnormalized_rows_are_normalized():
    tree = chain_tree([1])
    target = rows([0.0, 4.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0])  # [2, 4]
    draft = rows([0.0, 3.0, 0.0, 0.0], torch.zeros(4))  # [2, 4]
    assert tree_rejection_sample(tree, target, draft, gen(0)) == Acceptance([0], 3, True)


def test_rejection_sample_input_errors():
    tree = chain_tree([1, 2])
    good = torch.full((3, 4), 0.25)  # [3, 4]
    with pytest.raises(ValueError, match="target_probs"):
        tree_rejection_sample(tree, good[:2], good[:2], gen(0))
    with pytest.raises(ValueError, match="draft_probs"):
        tree_rejection_sample(tree, good, good[:, :3], gen(0))
    with pytest.raises(ValueError, match=r"target_probs\[0\]"):
        tree_rejection_sample(tree, torch.zeros(3, 4), good, gen(0))
