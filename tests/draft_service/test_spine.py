"""A dynamic tree where the C chain runs: the chain of first choices (the spine) plus leaves,
the draft's next choices along it (`draft_service.spine_leaves`)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from specmesh.clients.scheduled import chain_matched
from specmesh.draft_service import spine_leaves
from specmesh.draft_service.engine import DraftEngine, ProposeItem
from specmesh.kernels import load_for_service
from specmesh.kernels.runner import ForwardItem
from specmesh.kernels.sampling import SamplingConfig
from specmesh.kernels.seeding import round_generator
from specmesh.model_service.config import EngineConfig
from specmesh.wire.tree_spec import TreeSpec
from tests.conftest import WIDE_DRAFT

PROMPT = [1, 385, 328, 432, 261]  # "One day, a": an uncertain next token
DYNAMIC = TreeSpec.parse("dynamic:8/5")
SAMPLED = SamplingConfig(temperature=1.0, top_p=0.95, top_k=6)


def test_leaves_join_while_their_path_is_likely_enough_and_nodes_are_left():
    q = np.array([0.6, 0.25, 0.15, 0.0])
    assert spine_leaves.leaf_count(math.log(0.5), q, 3) == 1  # 0.125 yes, 0.075 no
    assert spine_leaves.leaf_count(0.0, q, 3) == 2  # 0.25, 0.15
    assert spine_leaves.leaf_count(0.0, q, 1) == 1  # the budget
    assert spine_leaves.leaf_count(0.0, q, 0) == 0
    assert spine_leaves.leaf_count(0.0, np.array([0.95, 0.05, 0.0, 0.0]), 3) == 0
    assert spine_leaves.leaf_count(0.0, np.array([0.8, 0.2, 0.0, 0.0]), 3) == 1  # no 0 leaf
    assert spine_leaves.leaf_count(0.0, np.array([0.6, 0.4]), 3) == 1  # a two-token vocabulary


def test_greedy_leaves_are_the_next_choices_and_sampled_ones_the_next_finishers():
    q = np.array([0.1, 0.5, 0.3, 0.1])
    assert spine_leaves.greedy_leaves(q, 1, 2) == [2, 0]  # a tie goes to the first index
    assert spine_leaves.greedy_leaves(q, 1, 0) == []
    q = np.array([0.5, 0.25, 0.25, 0.0])
    expo = np.array([1.0, 0.1, 0.6, 0.01])  # finish at 2.0, 0.4, 2.4, never
    assert spine_leaves.sampled_leaves(q, expo, 1, 2) == [0, 2]
    assert spine_leaves.sampled_leaves(q, expo, 1, 3) == [0, 2]  # q == 0 is never drawn


@pytest.fixture(scope="module")
def loaded(models):
    return load_for_service(models / WIDE_DRAFT, "float32", "cpu", None, quantize="int8")


def _propose(engine, seq_id, cached, new, spec=DYNAMIC, sampling=SamplingConfig(), seed=5):
    return engine.propose_batch([ProposeItem(seq_id=seq_id, num_cached_tokens=cached,
                                             new_tokens=new, spec=spec, sampling=sampling,
                                             seed=seed)])[0]


def _root_q(loaded, context) -> np.ndarray:
    """The draft's greedy distribution after `context`, from a plain forward."""
    engine = DraftEngine(loaded, EngineConfig())
    engine.kv.create("ref")
    assert engine.kv.reserve("ref", len(context)) is None
    logits = engine.runner.forward([ForwardItem("ref", context)])[0].logits[-1]  # [vocab]
    return torch.softmax(logits.float(), -1).numpy()


def test_a_greedy_spine_is_the_chain_and_its_leaves_the_next_choices(loaded):
    engine = DraftEngine(loaded, EngineConfig())
    tree = _propose(engine, "d", 0, PROMPT)
    chain = _propose(DraftEngine(loaded, EngineConfig()), "c", 0, PROMPT,
                     spec=TreeSpec.parse("chain:5"))
    assert tree.tokens[:5] == chain.tokens and tree.parents[:5] == [-1, 0, 1, 2, 3]
    assert tree.num_cached_tokens == chain.num_cached_tokens  # the spine's KV is kept
    leaves = list(zip(tree.parents[5:], tree.tokens[5:]))
    assert 1 <= len(leaves) <= 3 and all(p in (-1, 0, 1, 2, 3) for p, _ in leaves)
    q = _root_q(loaded, PROMPT)
    want = spine_leaves.leaf_count(0.0, q, 3)
    assert [t for p, t in leaves if p == -1] == list(np.argsort(-q, kind="stable")[1:1 + want])


def test_sampled_leaves_are_the_later_finishers_of_the_spines_race(loaded):
    # the root drawn in Python (prefill) / in the C chain (folded); over seeds, since the next
    # finisher is often the likeliest token too
    for fold, seed in [(f, s) for f in (False, True) for s in range(4)]:
        engine = DraftEngine(loaded, EngineConfig())
        res = _propose(engine, "s", 0, PROMPT[:-1] if fold else PROMPT, sampling=SAMPLED,
                       seed=seed)
        if fold:  # the last prompt token alone: the root after PROMPT drawn in the C chain
            res = _propose(engine, "s", len(PROMPT) - 1, PROMPT[-1:], sampling=SAMPLED,
                           seed=seed)
        position = len(PROMPT)
        support, probs = res.draft_dists[0]
        q = np.zeros(loaded.config.vocab_size)
        q[support] = probs.astype(np.float32)
        expo = torch.empty(loaded.config.vocab_size, dtype=torch.float64).exponential_(
            generator=round_generator(seed, position, "draft")).numpy()
        with np.errstate(divide="ignore"):
            order = np.argsort(expo / q, kind="stable")
        root_children = [t for p, t in zip(res.parents, res.tokens) if p == -1]
        assert len(root_children) >= 2, "the uncertain root should have a leaf"
        assert root_children == order[:len(root_children)].tolist()


@pytest.mark.parametrize("sampling", [SamplingConfig(), SAMPLED])
def test_folded_or_not_the_same_tree(loaded, sampling):
    trees = []
    for fold in (True, False):
        engine = DraftEngine(loaded, EngineConfig())
        engine.fold_first = fold
        first = _propose(engine, "s", 0, PROMPT, sampling=sampling)
        again = _propose(engine, "s", len(PROMPT) + 2, [first.tokens[0], first.tokens[1], 9],
                         sampling=sampling)
        trees.append([(r.tokens, r.parents, r.num_cached_tokens) for r in (first, again)])
    assert trees[0] == trees[1]


def test_after_a_leaf_is_accepted_the_draft_reruns_from_where_its_spine_left(loaded):
    engine = DraftEngine(loaded, EngineConfig())
    first = _propose(engine, "s", 0, PROMPT)
    leaf = next(i for i, p in enumerate(first.parents) if i >= 5 and p == -1)
    # the leaf is off the spine: nothing of the spine kept
    assert chain_matched(first.tokens, first.parents, [first.tokens[leaf], 7], 1) == 0
    kept = _propose(engine, "s", len(PROMPT), [first.tokens[leaf], 7])
    fresh = _propose(DraftEngine(loaded, EngineConfig()), "t", 0,
                     PROMPT + [first.tokens[leaf], 7])
    assert (kept.tokens, kept.parents) == (fresh.tokens, fresh.parents)


def test_the_client_keeps_the_draft_cache_up_to_the_first_accepted_token_off_its_chain():
    tree = ([5, 6, 7, 8, 9], [-1, 0, 1, -1, 0])
    assert chain_matched(*tree, [5, 6, 7, 2], 3) == 3
    assert chain_matched(*tree, [5, 9, 2], 2) == 1
    assert chain_matched(*tree, [8, 2], 1) == 0
    assert chain_matched(*tree, [3], 0) == 0


@pytest.mark.parametrize("sampling", [SamplingConfig(), SAMPLED])
def test_a_spine_grown_depth_by_depth_in_python_is_the_same_tree(loaded, sampling):
    """Batched with a chain of another length, a spine grows one Python-driven forward a
    depth (`TreeGrower.grow`), not in the C chain: the same nodes, leaves and draws."""
    alone = _propose(DraftEngine(loaded, EngineConfig()), "d", 0, PROMPT, sampling=sampling)
    engine = DraftEngine(loaded, EngineConfig())
    mixed = engine.propose_batch([
        ProposeItem(seq_id="c", num_cached_tokens=0, new_tokens=PROMPT[:3],
                    spec=TreeSpec.parse("chain:3")),
        ProposeItem(seq_id="d", num_cached_tokens=0, new_tokens=PROMPT, spec=DYNAMIC,
                    sampling=sampling, seed=5)])[1]
    assert (mixed.tokens, mixed.parents) == (alone.tokens, alone.parents)
    assert mixed.num_cached_tokens == alone.num_cached_tokens
    assert len(alone.tokens) > 5  # it has leaves
