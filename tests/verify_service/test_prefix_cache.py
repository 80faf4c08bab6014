"""Prefix KV through a real cache service over a real redis-server: the verify and draft services
load cached prefixes, store new chunks after prefill, and never change a token (or fail) for it."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from specmesh.cache_service.__main__ import start_server
from specmesh.cache_service.config import CacheServiceConfig
from specmesh.clients.async_client import AsyncSpecMeshClient
from specmesh.clients.tokenizer import TextCodec
from specmesh.kernels import load_model
from specmesh.model_service.config import EngineConfig
from specmesh.verify_service.engine import VerifyEngine, VerifyItem
from specmesh.wire.cache_client import CacheClient
from tests.conftest import TINY_DRAFT, TINY_TARGET
from tests.stack import model_server

pytestmark = [pytest.mark.models, pytest.mark.redis]

STORY = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the "
         "park. One day, she saw a big, red ball. She wanted to play with it, but it was too high.")
NUM_NEW = 24


@pytest.fixture(scope="module")
def prompts(models) -> dict[str, list[int]]:
    """Three prompts sharing the story's first chunks; "exact" is three whole chunks."""
    codec = TextCodec(models / TINY_TARGET)
    base = codec.encode(STORY)  # 62 tokens: 3 full chunks of 16
    return {"first": base + codec.encode(" Lily was sad.")[1:],
            "exact": base[:48],
            "second": base + codec.encode(" Then a bird came.")[1:]}


@pytest.fixture
async def cache_addr(redis_server):
    config = CacheServiceConfig(redis_url=redis_server.url, redis_timeout_s=0.2,
                                retry_after_s=0.3)
    server, servicer = await start_server(config)
    yield f"127.0.0.1:{server.port}"
    await server.stop(0.1)
    await servicer.close()


@contextlib.asynccontextmanager
async def stack(models, **config):
    """(client, verify servicer, draft servicer) over in-process servers."""
    async with model_server("verify", models / TINY_TARGET, **config) as (v, vs), \
            model_server("draft", models / TINY_DRAFT, **config) as (d, ds):
        async with AsyncSpecMeshClient(v, d) as client:
            yield client, vs, ds


async def generate(client, prompt: list[int], **kwargs) -> list[int]:
    out = await client.generate(prompt, NUM_NEW, ignore_eos=True, **kwargs)
    return out.token_ids


@pytest.fixture
async def reference(models, prompts) -> dict[str, list[int]]:
    """Target-only greedy output, no cache; speculation without cache gives the same."""
    async with stack(models) as (client, vs, _):
        assert vs.prefix is None
        ref = {name: await generate(client, p, speculate=False) for name, p in prompts.items()}
        for name, p in prompts.items():
            assert await generate(client, p, tree="chain:4") == ref[name]
    return ref


async def drain(*servicers) -> None:
    await asyncio.gather(*(s.prefix.drain() for s in servicers))


async def test_greedy_with_prefix_hits_equals_without(models, prompts, reference, cache_addr):
    async with stack(models, cache_addr=cache_addr) as (client, vs, ds), \
            CacheClient(cache_addr, timeout_s=5) as cache:
        assert await generate(client, prompts["first"], tree="chain:4") == reference["first"]
        await drain(vs, ds)
        stats = await cache.server_stats()
        assert stats.prefix_hits == 0 and stats.chunks_written == 2 * 4  # 4 chunks, 2 models

        for name in ("second", "exact"):  # shares 3 chunks; fully cached (runs its last token)
            assert await generate(client, prompts[name], tree="static:2,2") == reference[name]
            await drain(vs, ds)
        stats = await cache.server_stats()
        assert stats.prefix_hits == 2 * 2 and stats.prefix_tokens_hit == 2 * (48 + 48)
        assert stats.chunks_written == 2 * (4 + 1)  # "second" adds its own fourth chunk

        # a target-only request reads the target's chunks; the first prompt is now all hits
        assert await generate(client, prompts["first"], speculate=False) == reference["first"]
        assert await generate(client, prompts["first"], tree="dynamic:8") == reference["first"]
        await drain(vs, ds)
        assert (vs.prefix.stats.hits, vs.prefix.stats.lookups) == (4, 5)
        assert (ds.prefix.stats.hits, ds.prefix.stats.lookups) == (3, 4)
        assert vs.prefix.stats.tokens_loaded == 48 + 48 + 64 + 64
        assert vs.prefix.stats.store_errors == ds.prefix.stats.store_errors == 0


async def test_redis_killed_mid_run_changes_nothing(models, prompts, reference, cache_addr,
                                                    redis_server):
    async with stack(models, cache_addr=cache_addr) as (client, vs, ds):
        assert await generate(client, prompts["first"], tree="chain:4") == reference["first"]
        await drain(vs, ds)
        running = [asyncio.create_task(generate(client, prompts[name], tree="chain:3"))
                   for name in ("second", "exact")]
        await asyncio.sleep(0.05)
        redis_server.stop()
        outs = await asyncio.gather(*running)
        assert outs == [reference["second"], reference["exact"]]
        hits = vs.prefix.stats.hits, ds.prefix.stats.hits
        for name, p in prompts.items():  # every cache call now fails: all misses
            assert await generate(client, p, tree="chain:4") == reference[name]
        await drain(vs, ds)
        assert (vs.prefix.stats.hits, ds.prefix.stats.hits) == hits
        assert vs.prefix.stats.store_errors == 0  # failures are the client's misses


def test_engine_ignores_prefix_of_another_model(models, prompts):
    """Chunks shaped for the draft offered to the target are never loaded."""
    target = VerifyEngine(load_model(models / TINY_TARGET), EngineConfig(kv_cache_mb=8))
    draft = VerifyEngine(load_model(models / TINY_DRAFT), EngineConfig(kv_cache_mb=8))
    p = prompts["first"]
    ref = target.verify_batch([VerifyItem("a", 0, p)])[0]
    draft.verify_batch([VerifyItem("d", 0, p)])
    foreign = tuple(draft.export_prefix("d", p, 16, 0, 3))
    assert len(foreign) == 3
    got = target.verify_batch([VerifyItem("b", 0, p, prefix_chunks=foreign)])[0]
    assert got.tokens == ref.tokens and got.num_cached_tokens == len(p)
    own = tuple(target.export_prefix("a", p, 16, 0, 3))
    hit = target.verify_batch([VerifyItem("c", 0, p, prefix_chunks=own)])[0]
    assert hit.tokens == ref.tokens and target.sequences.tokens("c") == p
