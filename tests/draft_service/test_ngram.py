"""N-gram drafting: the pure lookup on exact tiny arrays, the token store, and the draft service
serving it (with and without a model) so that greedy output stays the target's."""

from __future__ import annotations

import numpy as np
import pytest

from specmesh.draft_service.engine import ProposeItem
from specmesh.draft_service.ngram import NgramConfig, match_starts, propose_tree
from specmesh.draft_service.ngram_engine import NgramDrafter, TokenHistories
from specmesh.errors import InvalidRequest, UnknownSequence
from specmesh.kernels.sampling import SamplingConfig
from specmesh.wire.tree_spec import TreeSpec


def arr(*tokens: int) -> np.ndarray:
    return np.asarray(tokens, dtype=np.int32)


def test_match_starts_most_recent_first_and_never_the_suffix_itself():
    h = arr(5, 6, 7, 5, 6, 9, 5, 6)  # suffix (5, 6) also at 0 and 3
    assert match_starts(h, 2, 10).tolist() == [5, 2]
    assert match_starts(h, 2, 1).tolist() == [5]
    assert match_starts(h, 3, 10).tolist() == []  # (9, 5, 6) occurs only at the end
    assert match_starts(arr(5, 6), 2, 10).tolist() == []


def test_a_single_match_is_a_chain_of_what_followed():
    h = arr(1, 2, 3, 4, 8, 1, 2)
    tokens, parents = propose_tree(h, 8, NgramConfig(max_depth=3))
    assert tokens == [3, 4, 8] and parents == [-1, 0, 1]


def edges(tokens, parents):
    """(token, parent's token or None) pairs: the tree whatever the node order."""
    return sorted((t, tokens[p] if p >= 0 else -1) for t, p in zip(tokens, parents))


def test_several_continuations_make_a_tree_ranked_by_evidence():
    # after (1, 2): "3 4" twice, "7 0" once (most recent); nodes in creation order
    h = arr(1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1, 2, 7, 0, 1, 2)
    cfg = NgramConfig(min_n=2, max_n=2, max_depth=2)
    tokens, parents = propose_tree(h, 3, cfg)  # the budget keeps the best-supported nodes
    assert (tokens, parents) == ([7, 3, 4], [-1, -1, 1])
    assert edges(tokens, parents) == [(3, -1), (4, 3), (7, -1)]
    tokens, parents = propose_tree(h, 4, cfg)  # then the weaker branch's next token
    assert (tokens, parents) == ([7, 0, 3, 4], [-1, 0, -1, 2])


def test_chain_follows_the_best_supported_child():
    h = arr(1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1, 2, 7, 0, 1, 2)
    cfg = NgramConfig(min_n=2, max_n=2, max_depth=3)
    assert propose_tree(h, 8, cfg, chain=True) == ([3, 4, 0], [-1, 0, 1])
    assert propose_tree(h, 2, cfg, chain=True) == ([3, 4], [-1, 0])


def test_longer_suffixes_weigh_more_and_parents_come_first():
    h = arr(9, 1, 2, 5, 3, 1, 2, 6, 9, 1, 2)  # (9,1,2) -> 5 ; (1,2) -> 6 and 5
    tokens, parents = propose_tree(h, 2, NgramConfig(min_n=2, max_n=3, max_depth=1))
    assert tokens[0] == 5 and set(tokens) == {5, 6} and parents == [-1, -1]
    for i, p in enumerate(parents):
        assert p < i


def test_nothing_repeats_nothing_proposed():
    assert propose_tree(arr(1, 2, 3, 4), 8) == ([], [])
    assert propose_tree(arr(1, 2, 1), 0) == ([], [])


def test_histories_sync_like_a_model_service():
    store = TokenHistories(max_sequences=2)
    assert store.sync("a", 0, [1, 2, 3]).tolist() == [1, 2, 3]
    assert store.sync("a", 2, [9]).tolist() == [1, 2, 9]  # rolled back one, appended
    with pytest.raises(UnknownSequence):
        store.sync("b", 3, [1])
    with pytest.raises(InvalidRequest, match="num_cached_tokens"):
        store.sync("a", 7, [1])
    with pytest.raises(InvalidRequest, match="new_tokens"):
        store.sync("c", 0, [])
    store.sync("b", 0, [1])
    store.sync("c", 0, [1])  # over max_sequences: the least recently used ("a") goes
    with pytest.raises(UnknownSequence):
        store.sync("a", 1, [4])
    assert store.release(["b", "zzz"]) == 1


def test_drafter_sends_point_masses_when_sampling():
    drafter = NgramDrafter()
    item = ProposeItem(seq_id="s", num_cached_tokens=0, new_tokens=[1, 2, 3, 1, 2],
                       spec=TreeSpec.parse("ngram:4"), sampling=SamplingConfig(temperature=1.0))
    out = drafter.propose(item)
    assert out.tokens == [3, 1, 2] and out.parents == [-1, 0, 1] and out.num_cached_tokens == 5
    assert out.draft_dists == [None] * 4  # all-zero rows: fixed candidates (lossless)
    greedy = drafter.propose(ProposeItem(seq_id="s", num_cached_tokens=5, new_tokens=[3],
                                         spec=TreeSpec.parse("ngram:4")))
    assert greedy.draft_dists == [] and greedy.num_cached_tokens == 6


def test_tree_spec_text_and_proto_round_trip():
    spec = TreeSpec.parse("ngram:8")
    assert spec.model_free and spec.max_nodes == 8 and str(spec) == "ngram:8"
    assert TreeSpec.from_proto(spec.to_proto()) == spec
    for text in ("dynamic:7/5", "dynamic:16", "chain:5", "static:4,2,2,1", "ngram:8/3", "none"):
        assert str(TreeSpec.parse(text)) == text  # a depth bound is kept (bench rows by name)
    with pytest.raises(InvalidRequest, match="node_budget"):
        TreeSpec("ngram", node_budget=0).validate()
