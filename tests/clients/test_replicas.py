"""Replica sets in the client: N draft and M verify replicas with sequence affinity (rendezvous
hashing) and failover (a replica killed mid-run: its sequences move, resend their context, and
every output stays the single-replica target-only output)."""

from __future__ import annotations

import asyncio
import time

import pytest

from specmesh.clients.async_client import AsyncSpecMeshClient
from specmesh.clients.local_stack import ServiceProcess
from specmesh.clients.replicas import expand, rendezvous
from tests.conftest import TINY_DRAFT, TINY_TARGET
from tests.stack import model_server

PROMPTS = ["Once upon a time", "The little dog", "Tom had a big red ball", "Sam and Mia",
           "There was a tiny bird", "The old tree"]


def test_expand_lists_and_dns_names():
    assert expand("a:1, b:2") == ["a:1", "b:2"]
    assert "127.0.0.1:50051" in expand("dns:///localhost:50051")


def test_rendezvous_is_stable_and_moves_only_the_lost_replicas_ids():
    ids = [f"seq-{i}" for i in range(200)]
    three = {s: rendezvous(s, ["a", "b", "c"]) for s in ids}
    assert set(three.values()) == {"a", "b", "c"}
    two = {s: rendezvous(s, ["a", "c"]) for s in ids}
    assert all(two[s] == three[s] for s in ids if three[s] != "b")  # only b's ids moved


async def test_dns_targets_are_re_resolved(monkeypatch):
    import specmesh.clients.replicas as replicas

    answers = {"dns:///svc:1": ["10.0.0.1:1", "10.0.0.2:1"]}
    monkeypatch.setattr(replicas, "expand", lambda target: answers[target])
    rs = replicas.ReplicaSet.connect("dns:///svc:1", lambda channel: object(),
                                     resolve_every_s=0.0)
    rs.pinned.update({"a": "10.0.0.1:1", "b": "10.0.0.2:1"})
    answers["dns:///svc:1"] = ["10.0.0.2:1", "10.0.0.3:1"]  # a pod left, one arrived
    rs._maybe_refresh()
    assert [r.address for r in rs.replicas] == ["10.0.0.2:1", "10.0.0.3:1"]
    assert rs.pinned == {"b": "10.0.0.2:1"}  # a's replica left: routed anew on its next call
    assert rs.route("a").address in {"10.0.0.2:1", "10.0.0.3:1"}
    await rs.close()


async def _outputs(client, n: int, max_new: int = 32) -> list[list[int]]:
    outs = await asyncio.gather(*(client.generate(PROMPTS[i % len(PROMPTS)], max_new,
                                                  ignore_eos=True) for i in range(n)))
    return [o.token_ids for o in outs]


@pytest.mark.models
async def test_two_by_two_replicas_give_the_single_replica_output(models):
    async with model_server("verify", models / TINY_TARGET) as (v1, _), \
            model_server("verify", models / TINY_TARGET) as (v2, _), \
            model_server("draft", models / TINY_DRAFT) as (d1, _), \
            model_server("draft", models / TINY_DRAFT) as (d2, _):
        async with AsyncSpecMeshClient(v1, None, str(models / TINY_TARGET)) as single:
            want = [o.token_ids for o in await asyncio.gather(*(
                single.generate(p, 32, ignore_eos=True, speculate=False) for p in PROMPTS))]
        async with AsyncSpecMeshClient(f"{v1},{v2}", f"{d1},{d2}",
                                       str(models / TINY_TARGET)) as client:
            got = await _outputs(client, 24)
            verify_set, draft_set = client._replica_sets
            assert all(r.items_served > 0 for r in verify_set.replicas + draft_set.replicas)
    assert got == [want[i % len(PROMPTS)] for i in range(24)]


@pytest.mark.models
@pytest.mark.parametrize("victim", ["verify", "draft"])
async def test_kill_9_of_a_replica_mid_run_keeps_every_output(models, victim):
    procs = {name: ServiceProcess(name, [f"specmesh.{kind}_service", "--model", str(model),
                                         "--port", "0"])
             for name, kind, model in (("v1", "verify", models / TINY_TARGET),
                                       ("v2", "verify", models / TINY_TARGET),
                                       ("d1", "draft", models / TINY_DRAFT),
                                       ("d2", "draft", models / TINY_DRAFT))}
    try:
        await asyncio.gather(*(p.start() for p in procs.values()))
        a = {k: p.address for k, p in procs.items()}
        async with AsyncSpecMeshClient(a["v1"], None, str(models / TINY_TARGET)) as single:
            want = [o.token_ids for o in await asyncio.gather(*(
                single.generate(p, 48, ignore_eos=True, speculate=False) for p in PROMPTS))]
        async with AsyncSpecMeshClient(f"{a['v1']},{a['v2']}", f"{a['d1']},{a['d2']}",
                                       str(models / TINY_TARGET)) as client:
            run = asyncio.ensure_future(_outputs(client, 24, 48))
            verify_set, draft_set = client._replica_sets
            target = (verify_set if victim == "verify" else draft_set).replicas[1]
            deadline = time.monotonic() + 30
            while target.items_served == 0 and time.monotonic() < deadline and not run.done():
                await asyncio.sleep(0.01)  # mid-run: the victim has served some of it
            killed_at = time.monotonic()
            procs["v2" if victim == "verify" else "d2"].proc.kill()  # SIGKILL mid-run
            got = await run
            stall = time.monotonic() - killed_at
            verify_set, draft_set = client._replica_sets
            dead = (verify_set if victim == "verify" else draft_set).replicas[1]
            assert not dead.alive and dead.items_served > 0  # it served, failed, was taken out
        print(f"\n{victim} replica killed: remaining requests finished {stall:.2f} s later")
        assert got == [want[i % len(PROMPTS)] for i in range(24)]
    finally:
        for p in procs.values():
            p.stop()


@pytest.mark.models
@pytest.mark.redis
async def test_a_prefix_prefilled_on_one_replica_is_a_cache_hit_on_another(models, redis_server):
    from specmesh.cache_service.__main__ import start_server
    from specmesh.cache_service.config import CacheServiceConfig

    server, cache = await start_server(CacheServiceConfig(redis_url=redis_server.url))
    cache_addr = f"127.0.0.1:{server.port}"
    story = ("Once upon a time, there was a little girl named Lily. She loved to play outside "
             "in the park. One day, she saw a big, red ball.")
    try:
        async with model_server("verify", models / TINY_TARGET, cache_addr=cache_addr) as (
                v1, s1), model_server("verify", models / TINY_TARGET, cache_addr=cache_addr) as (
                v2, s2):
            async with AsyncSpecMeshClient(v1, None, str(models / TINY_TARGET)) as a:
                first = await a.generate(story, 16, ignore_eos=True)
            await s1.prefix.drain()  # replica A's chunks are in the cache
            async with AsyncSpecMeshClient(v2, None, str(models / TINY_TARGET)) as b:
                second = await b.generate(story, 16, ignore_eos=True)
            assert second.token_ids == first.token_ids
            assert s1.prefix.stats.hits == 0 and s2.prefix.stats.hits == 1
            assert s2.prefix.stats.tokens_loaded >= 32  # whole chunks prefilled on replica A
    finally:
        await server.stop(0.1)
        await cache.close()


@pytest.mark.models
@pytest.mark.redis
async def test_two_by_two_over_a_redis_cluster_survive_a_dead_master(models, tmp_path):
    """2 verify + 2 draft replicas sharing a cache service on a 3-master Redis Cluster; one
    master is killed mid-run: no request fails and every output is the target-only output."""
    from specmesh.cache_service.__main__ import start_server
    from specmesh.cache_service.config import CacheServiceConfig
    from tests.cache_service.test_cluster import RedisCluster

    cluster = RedisCluster(tmp_path)
    cluster.start()
    server, cache = await start_server(CacheServiceConfig(
        redis_url=cluster.url, redis_timeout_s=0.3, retry_after_s=0.5))
    c = f"127.0.0.1:{server.port}"
    story = "Once upon a time, there was a little girl named Lily. She loved to play outside. "
    try:
        async with model_server("verify", models / TINY_TARGET, cache_addr=c) as (v1, _), \
                model_server("verify", models / TINY_TARGET, cache_addr=c) as (v2, _), \
                model_server("draft", models / TINY_DRAFT, cache_addr=c) as (d1, _), \
                model_server("draft", models / TINY_DRAFT, cache_addr=c) as (d2, _):
            prompts = [story + p for p in PROMPTS]
            async with AsyncSpecMeshClient(v1, None, str(models / TINY_TARGET)) as single:
                want = [o.token_ids for o in await asyncio.gather(*(
                    single.generate(p, 32, ignore_eos=True, speculate=False) for p in prompts))]
            async with AsyncSpecMeshClient(f"{v1},{v2}", f"{d1},{d2}",
                                           str(models / TINY_TARGET)) as client:
                run = asyncio.gather(*(client.generate(prompts[i % len(prompts)], 32,
                                                       ignore_eos=True) for i in range(24)))
                await asyncio.sleep(0.2)
                assert not run.done()  # the master dies mid-run
                cluster.kill(cluster.ports[2])
                got = [o.token_ids for o in await run]
                verify_set, _ = client._replica_sets
                assert all(r.items_served > 0 for r in verify_set.replicas)
        assert got == [want[i % len(prompts)] for i in range(24)]
    finally:
        await server.stop(0.1)
        await cache.close()
        cluster.stop()
