"""The draft keeps its chain's KV across rounds: the next round re-runs only the tokens after the
accepted nodes, and proposes what a draft prefilling the whole context would."""

from __future__ import annotations

import pytest

from specmesh.draft_service.engine import DraftEngine, ProposeItem
from specmesh.kernels import load_for_service
from specmesh.kernels.sampling import SamplingConfig
from specmesh.model_service.config import EngineConfig
from specmesh.wire.tree_spec import TreeSpec
from tests.conftest import WIDE_DRAFT

PROMPT = [1, 403, 407, 261, 378, 411, 273, 334, 306, 365]
CHAIN = TreeSpec.parse("chain:5")


@pytest.fixture(scope="module")
def loaded(models):
    return load_for_service(models / WIDE_DRAFT, "float32", "cpu", None, quantize="int8")


def _propose(engine, seq_id, cached, new, temperature=0.0):
    return engine.propose_batch([ProposeItem(
        seq_id=seq_id, num_cached_tokens=cached, new_tokens=new, spec=CHAIN, seed=3,
        sampling=SamplingConfig(temperature=temperature, top_p=0.95))])[0]


@pytest.mark.parametrize("accepted", [0, 2, 4])
@pytest.mark.parametrize("fold", [True, False])
def test_next_round_reuses_the_accepted_nodes_kv(loaded, accepted, fold):
    engine = DraftEngine(loaded, EngineConfig())
    engine.fold_first = fold and engine.fold_first
    first = _propose(engine, "s", 0, PROMPT)
    assert first.num_cached_tokens == len(PROMPT) + 4  # the 4 fed nodes (the 5th never is)
    context = PROMPT + first.tokens[:accepted] + [7]  # accepted nodes, then the bonus token
    kept = _propose(engine, "s", len(PROMPT) + accepted, [7])
    fresh = _propose(DraftEngine(loaded, EngineConfig()), "t", 0, context)
    assert kept.tokens == fresh.tokens and kept.parents == fresh.parents
    assert kept.num_cached_tokens == fresh.num_cached_tokens == len(context) + 4


@pytest.mark.parametrize("resent", [0, 2])
@pytest.mark.parametrize("fold", [True, False])
def test_a_whole_chain_accepted_feeds_its_last_node_and_the_bonus(loaded, fold, resent):
    """All 5 accepted: the 5th node was never fed, so two new tokens come (more when the
    client resends some); folded, all but the last go through forced chain depths."""
    engine = DraftEngine(loaded, EngineConfig())
    engine.fold_first = fold and engine.fold_first
    first = _propose(engine, "s", 0, PROMPT)
    context = PROMPT + first.tokens + [7]
    cached = len(PROMPT) + 4 - resent
    kept = _propose(engine, "s", cached, context[cached:])
    fresh = _propose(DraftEngine(loaded, EngineConfig()), "t", 0, context)
    assert kept.tokens == fresh.tokens and kept.parents == fresh.parents
    assert kept.num_cached_tokens == fresh.num_cached_tokens == len(context) + 4


def test_a_sampled_chain_keeps_its_nodes_too_and_folds_its_root_draw(loaded):
    runs = []
    for fold in (True, False):
        engine = DraftEngine(loaded, EngineConfig())
        engine.fold_first = fold
        first = _propose(engine, "s", 0, PROMPT, temperature=0.8)
        assert first.num_cached_tokens == len(PROMPT) + 4
        again = _propose(engine, "s", len(PROMPT) + 1, [7], temperature=0.8)
        assert again.num_cached_tokens == len(PROMPT) + 2 + 4 and len(again.tokens) == 5
        whole = _propose(engine, "s", again.num_cached_tokens, [again.tokens[4], 9],
                         temperature=0.8)  # all accepted: the last node and the bonus
        assert whole.num_cached_tokens == again.num_cached_tokens + 2 + 4
        runs.append([(r.tokens, [(d[0].tolist(), d[1].tolist()) for d in r.draft_dists
                                 if d is not None]) for r in (again, whole)])
    assert runs[0] == runs[1]  # the same draws from the same generator, folded or not


def test_a_wider_tree_keeps_no_nodes(loaded):
    engine = DraftEngine(loaded, EngineConfig())
    res = engine.propose_batch([ProposeItem(seq_id="s", num_cached_tokens=0, new_tokens=PROMPT,
                                            spec=TreeSpec.parse("static:2,2"))])[0]
    assert len(res.tokens) == 6 and res.num_cached_tokens == len(PROMPT)
