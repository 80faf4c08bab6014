"""The fleet n-gram table on the draft side: the pure merge and slicing (exact tiny inputs), then
FleetTable's background fetch / admission / publish over a fake cache client."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

from specmesh.draft_service.engine import ProposeItem
from specmesh.draft_service.ngram import propose_tree
from specmesh.draft_service.ngram_engine import NgramDrafter
from specmesh.draft_service.ngram_fleet import (
    FleetConfig,
    FleetTable,
    end_contexts,
    fleet_continuations,
    publish_pieces,
)
from specmesh.kernels.sampling import SamplingConfig
from specmesh.wire.tree_spec import TreeSpec

CONFIG = FleetConfig()  # contexts of 2..4 tokens, weight 0.5, lookback 8


def test_fleet_continuations_join_the_trie_after_local_matches():
    history = np.array([1, 2, 3, 1, 2])  # local: [3, 1, 2] after (1, 2) and after (2,)
    assert propose_tree(history, 4) == ([3, 1, 2], [-1, 0, 1])
    # a fleet continuation adds its own branch; local evidence ranks first
    assert propose_tree(history, 4, extra=[(0.5, (7, 8))]) == ([3, 1, 2, 7], [-1, 0, 1, -1])
    # and merges into local branches (3 gains 0.5 and a child 9)
    assert propose_tree(history, 6, extra=[(0.5, (7, 8)), (0.5, (3, 9))]) == \
        ([3, 1, 2, 7, 8, 9], [-1, 0, 1, -1, 3, 0])
    # nothing local: the fleet alone drafts, the heavier continuation first; chains follow it
    lone = np.array([1, 2, 3])
    assert propose_tree(lone, 4, extra=[(1.5, (7, 8)), (0.5, (5,))]) == ([7, 8, 5], [-1, 0, -1])
    assert propose_tree(lone, 4, chain=True, extra=[(1.5, (7, 8)), (0.5, (5,))]) == \
        ([7, 8], [-1, 0])


def test_fleet_continuations_weigh_by_context_length_and_count():
    history = np.array([9, 5, 6, 7])
    known = {(5, 6, 7): [((8, 9), 3)], (6, 7): [((4,), 1)], (9, 5, 6, 7): []}
    assert fleet_continuations(history, known, CONFIG) == [
        (3 * 0.5 * math.log2(4), (8, 9)), (2 * 0.5 * 1.0, (4,))]


def test_a_context_fetched_tokens_ago_serves_through_its_agreeing_continuations():
    history = np.array([4, 5, 6, 7, 8])  # (4, 5, 6) ended two tokens back; 7, 8 came since
    known = {(4, 5, 6): [((7, 8, 9, 10), 2), ((7, 1, 1), 9), ((7, 8), 5)]}
    # (7, 1, 1) disagrees with what came since, (7, 8) has nothing left after it
    assert fleet_continuations(history, known, CONFIG) == [(3 * 0.5 * math.log2(3), (9, 10))]
    # the nearest context of each length wins: (5, 6, 7) one token back hides (4, 5, 6)
    known[(5, 6, 7)] = [((8, 3), 1)]
    assert fleet_continuations(history, known, CONFIG) == [(1.5, (3,))]


def test_end_contexts_and_publish_pieces():
    assert end_contexts([1, 2, 3, 4, 5], CONFIG) == [(2, 3, 4, 5), (3, 4, 5), (4, 5)]
    assert end_contexts([1, 2, 3], CONFIG, lookback=2) == [(1, 2, 3), (2, 3), (1, 2)]
    assert end_contexts([1], CONFIG) == []
    # (slice start, first, end) within the cache's 8192 n-grams per call (3 lengths: 2730)
    assert publish_pieces(10, 20, CONFIG) == [(6, 4, 14)]
    assert publish_pieces(2, 6000, CONFIG) == [(0, 2, 2732), (2728, 4, 2734), (5458, 4, 542)]


class FakeCache:
    """Records calls; answers GetNgrams from `table` (context -> continuations)."""

    def __init__(self, table=None, delay_s: float = 0.0, fail: bool = False):
        self.table = table or {}
        self.delay_s, self.fail = delay_s, fail
        self.gets: list[list[tuple[int, ...]]] = []
        self.puts: list[dict] = []
        self.closed = False

    async def get_ngrams(self, key, contexts, max_continuations=0, timeout_s=None):
        self.gets.append([tuple(c) for c in contexts])
        await asyncio.sleep(self.delay_s)
        if self.fail:
            return None
        return [list(self.table.get(tuple(c), [])) for c in contexts]

    async def put_ngrams(self, key, token_ids, **kw):
        self.puts.append(dict(key=key, tokens=list(token_ids), **kw))
        return 1

    async def close(self):
        self.closed = True


def item(seq: str, cached: int, new: list[int], budget: int = 4) -> ProposeItem:
    return ProposeItem(seq_id=seq, num_cached_tokens=cached, new_tokens=new,
                       spec=TreeSpec("ngram", node_budget=budget),
                       sampling=SamplingConfig(temperature=0.0), seed=None)


async def test_missing_contexts_are_fetched_in_the_background_and_serve_the_next_round():
    cache = FakeCache({(2, 3): [((4, 5), 2)]})
    drafter = NgramDrafter(fleet=FleetTable(cache, "fp", FleetConfig(admission_wait_s=0)))
    await drafter.prepare(item("a", 0, [1, 2, 3]))
    assert drafter.propose(item("a", 0, [1, 2, 3])).tokens == []  # not fetched yet: no wait
    await asyncio.sleep(0.01)
    assert cache.gets[0] == [(1, 2, 3), (2, 3), (1, 2)]  # newest position first, one call
    assert drafter.propose(item("a", 3, [])).tokens == [4, 5]
    # a round later the (2, 3) entry still serves through its continuation that agreed
    assert drafter.propose(item("a", 3, [4])).tokens == [5]
    await asyncio.sleep(0.01)
    assert {(2, 3, 4), (3, 4)} <= set(cache.gets[-1])  # the new end contexts were asked for


async def test_admission_waits_a_bounded_time_for_the_prompt_contexts():
    cache = FakeCache({(2, 3): [((4,), 1)]}, delay_s=0.001)
    drafter = NgramDrafter(fleet=FleetTable(cache, "fp", FleetConfig(admission_wait_s=1.0)))
    first = item("a", 0, [1, 2, 3])
    await drafter.prepare(first)
    assert drafter.propose(first).tokens == [4]
    slow = FakeCache({(2, 3): [((4,), 1)]}, delay_s=1.0)
    drafter = NgramDrafter(fleet=FleetTable(slow, "fp", FleetConfig(admission_wait_s=0.01)))
    start = asyncio.get_running_loop().time()
    await drafter.prepare(first)
    assert asyncio.get_running_loop().time() - start < 0.5
    assert drafter.propose(first).tokens == []
    await drafter.close()


async def test_finished_sequences_publish_their_generated_tokens_after_prompt_context():
    cache = FakeCache()
    drafter = NgramDrafter(fleet=FleetTable(cache, "fp", FleetConfig(admission_wait_s=0)))
    prompt = list(range(10, 20))
    drafter.propose(item("a", 0, prompt))
    drafter.propose(item("a", 10, [30, 31, 32]))
    drafter.release(["a"])
    await asyncio.sleep(0.01)
    (put,) = cache.puts
    # 4 tokens of prompt context, then the generated ones; continuations start at 30
    assert put["tokens"] == [16, 17, 18, 19, 30, 31, 32]
    assert (put["first"], put["end"], put["min_n"], put["max_n"], put["max_depth"]) == \
        (4, 7, 2, 4, 8)
    drafter.release(["a"])  # released twice, unknown: nothing more
    await drafter.close()
    assert len(cache.puts) == 1 and cache.closed


async def test_long_sequences_publish_every_so_many_tokens():
    cache = FakeCache()
    config = FleetConfig(admission_wait_s=0, publish_every=8, max_depth=2)
    drafter = NgramDrafter(fleet=FleetTable(cache, "fp", config))
    drafter.propose(item("a", 0, [1, 2, 3]))
    drafter.propose(item("a", 3, list(range(40, 49))))  # 8 generated with whole continuations
    drafter.propose(item("a", 12, [49]))
    await asyncio.sleep(0.01)
    (put,) = cache.puts
    assert put["tokens"] == [1, 2, 3, *range(40, 50)] and (put["first"], put["end"]) == (3, 11)
    drafter.release(["a"])
    await asyncio.sleep(0.01)
    assert cache.puts[1]["tokens"] == [44, 45, 46, 47, 48, 49]
    assert (cache.puts[1]["first"], cache.puts[1]["end"]) == (4, 6)


async def test_cache_trouble_is_only_a_miss():
    cache = FakeCache(fail=True)
    drafter = NgramDrafter(fleet=FleetTable(cache, "fp", FleetConfig(admission_wait_s=0.05)))
    await drafter.prepare(item("a", 0, [1, 2, 3, 1, 2]))
    assert drafter.propose(item("a", 0, [1, 2, 3, 1, 2])).tokens == [3, 1, 2]  # local only
    await asyncio.sleep(0.01)
    assert drafter.propose(item("a", 5, [3])).tokens == [1, 2, 3]


def test_a_fleet_table_needs_a_key():
    with pytest.raises(ValueError):
        FleetTable(FakeCache(), "")
