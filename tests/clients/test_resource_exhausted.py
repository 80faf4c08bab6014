"""A verify service whose KV cache cannot hold everyone answers RESOURCE_EXHAUSTED; the client
queues, retries and completes every request with the target-only output."""

from __future__ import annotations

import asyncio

import pytest

from specmesh.clients.async_client import AsyncSpecMeshClient
from specmesh.wire.errors import CapacityExhausted
from tests.conftest import TINY_DRAFT, TINY_TARGET
from tests.stack import model_server

pytestmark = pytest.mark.models
PROMPTS = ["Once upon a time", "The little dog", "Tom and Sue went to the", "One day, a bird",
           "Lily wanted to", "The sun was", "A big bear", "Mom said"]


async def test_exhausted_kv_cache_queues_and_completes(models):
    # tiny target: 1280 bytes of KV per token -> 0.25 MiB = 12 blocks of 16 tokens; each
    # sequence needs 3-4 blocks by its end, eight of them need ~28
    async with model_server("verify", models / TINY_TARGET, kv_cache_mb=0.25) as (verify, vs), \
            model_server("draft", models / TINY_DRAFT) as (draft, _):
        exhausted = []
        run_batch = vs.worker._run_batch

        def counting(items):
            out = run_batch(items)
            exhausted.extend(r for r in out if isinstance(r, CapacityExhausted))
            return out

        vs.worker._run_batch = counting
        async with AsyncSpecMeshClient(verify, draft, str(models / TINY_TARGET)) as client:
            plain = [await client.generate(p, 40, speculate=False, ignore_eos=True)
                     for p in PROMPTS]
            results = await asyncio.gather(*(
                client.generate(p, 40, tree="chain:4", ignore_eos=True) for p in PROMPTS))
        assert vs.engine.kv.num_blocks == 12
    assert exhausted, "the test must actually exhaust the KV cache"
    assert [r.token_ids for r in results] == [r.token_ids for r in plain]
    assert all(len(r.token_ids) == 40 for r in results)
