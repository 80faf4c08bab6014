"""ResultCache over a real cache service and redis-server: hits for deterministic requests only."""

from __future__ import annotations

from dataclasses import replace

import pytest

from specmesh.cache_service.__main__ import start_server
from specmesh.cache_service.config import CacheServiceConfig
from specmesh.clients.result_cache import ResultCache
from specmesh.clients.types import GenerationParams
from specmesh.wire.tree_spec import TreeSpec

pytestmark = pytest.mark.redis

PROMPT = [1, 403, 407, 261, 9]
OUT = [42, 43, 44, 2]
GREEDY = GenerationParams(max_new_tokens=8)
SEEDED = GenerationParams(max_new_tokens=8, temperature=0.8, top_p=0.9, seed=7)


@pytest.fixture
async def env(redis_server):
    server, servicer = await start_server(CacheServiceConfig(
        redis_url=redis_server.url, redis_timeout_s=0.2, retry_after_s=0.3))
    cache = ResultCache(f"127.0.0.1:{server.port}", timeout_s=2.0)
    yield cache, servicer.engine.stats, redis_server
    await cache.close()
    await server.stop(0.1)
    await servicer.close()


async def test_greedy_miss_store_hit(env):
    cache, _, _ = env
    args = (PROMPT, "draft-fp", "target-fp", "chain:4")
    assert await cache.lookup(GREEDY, *args) is None
    assert await cache.store(GREEDY, *args, OUT, "eos")
    assert await cache.lookup(GREEDY, *args) == OUT
    hit = await cache.lookup_result(GREEDY, *args)
    assert (hit.token_ids, hit.finish_reason) == (OUT, "eos")
    # greedy output is the target's: any draft, tree, or no speculation shares the entry,
    # and so do the sampling fields greedy never reads
    assert await cache.lookup(GREEDY, PROMPT, "other-draft", "target-fp", "dynamic:16") == OUT
    assert await cache.lookup(replace(GREEDY, speculate=False, top_k=5, seed=3),
                              PROMPT, "", "target-fp", "none") == OUT
    # anything that decides the output is in the key
    for params, prompt, target in [(replace(GREEDY, max_new_tokens=9), PROMPT, "target-fp"),
                                   (replace(GREEDY, ignore_eos=True), PROMPT, "target-fp"),
                                   (replace(GREEDY, stop=("x",)), PROMPT, "target-fp"),
                                   (GREEDY, PROMPT[:-1], "target-fp"),
                                   (GREEDY, PROMPT, "other-target")]:
        assert await cache.lookup(params, prompt, "draft-fp", target, "chain:4") is None
    assert (cache.stats.hits, cache.stats.errors) == (4, 0)


async def test_seeded_sampling_is_keyed_by_seed_draft_and_tree(env):
    cache, _, _ = env
    assert await cache.store(SEEDED, PROMPT, "draft-fp", "target-fp", "chain:4", OUT, "length")
    assert await cache.lookup(SEEDED, PROMPT, "draft-fp", "target-fp", "chain:4") == OUT
    for params, draft, tree in [(replace(SEEDED, seed=8), "draft-fp", "chain:4"),
                                (replace(SEEDED, temperature=0.7), "draft-fp", "chain:4"),
                                (replace(SEEDED, top_k=3), "draft-fp", "chain:4"),
                                (SEEDED, "other-draft", "chain:4"),
                                (SEEDED, "draft-fp", "chain:3")]:
        assert await cache.lookup(params, PROMPT, draft, "target-fp", tree) is None
    # without speculation neither the draft nor the tree matters
    plain = replace(SEEDED, speculate=False, tree=TreeSpec())
    assert await cache.store(plain, PROMPT, "draft-fp", "target-fp", "a", OUT, "length")
    assert await cache.lookup(plain, PROMPT, "", "target-fp", "b") == OUT


async def test_nondeterministic_and_cancelled_are_never_cached(env):
    cache, server_stats, _ = env
    unseeded = replace(SEEDED, seed=None)
    adaptive = replace(SEEDED, adaptive=True)
    for params in (unseeded, adaptive):
        assert ResultCache.key(params, PROMPT, "d", "t", "chain:4") is None
        assert not await cache.store(params, PROMPT, "d", "t", "chain:4", OUT, "length")
        assert await cache.lookup(params, PROMPT, "d", "t", "chain:4") is None
    assert not await cache.store(GREEDY, PROMPT, "d", "t", "chain:4", OUT[:2], "cancelled")
    assert await cache.lookup(GREEDY, PROMPT, "d", "t", "chain:4") is None
    assert ResultCache.key(replace(GREEDY, adaptive=True), PROMPT, "d", "t", "x") is not None
    # auto-adaptive (adaptive=None) stays off for seeded sampling: still cacheable
    assert ResultCache.key(replace(SEEDED, adaptive=None), PROMPT, "d", "t", "x") is not None
    assert cache.stats.skipped == 5
    assert server_stats.results_written == 0  # no call reached the service for those
    assert server_stats.result_misses == 1


async def test_redis_down_is_a_miss(env):
    cache, _, redis = env
    assert await cache.store(GREEDY, PROMPT, "d", "t", "chain:4", OUT, "eos")
    redis.stop()
    assert await cache.lookup(GREEDY, PROMPT, "d", "t", "chain:4") is None
    assert not await cache.store(GREEDY, PROMPT[:3], "d", "t", "chain:4", OUT, "eos")
