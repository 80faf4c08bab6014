"""Priority classes over real services (tiny pair, a verify KV cache too small for the flood):
batch requests are preempted, interactive ones never; every request still gets exactly its
target-only output and every batch request finishes. Timing is the bench's business
(`python -m specmesh.loadtest.priority_bench`); this checks behaviour only."""

from __future__ import annotations

import argparse
import asyncio

import pytest

from specmesh.clients.async_client import AsyncSpecMeshClient
from specmesh.loadtest import priority_bench
from specmesh.loadtest.prompts import OPEN
from specmesh.wire.tree_spec import TreeSpec
from tests.conftest import TINY_DRAFT, TINY_TARGET
from tests.stack import model_server

pytestmark = pytest.mark.models


async def flood(models, num_batch: int, batch_tokens: int, num_interactive: int):
    tok = str(models / TINY_TARGET)
    async with model_server("verify", models / TINY_TARGET, kv_cache_mb=1) as (v, _), \
            model_server("draft", models / TINY_DRAFT) as (d, _):
        async with AsyncSpecMeshClient(v, None, tok) as plain:
            want = {p: (await plain.generate(p, batch_tokens, speculate=False,
                                             ignore_eos=True)).token_ids
                    for p in OPEN[:num_batch]}
        async with AsyncSpecMeshClient(v, d, tok) as client:
            batch = [asyncio.create_task(client.generate(
                OPEN[i % len(OPEN)], batch_tokens, ignore_eos=True, priority="batch"))
                for i in range(num_batch)]
            sched = client._loop.scheduler  # noqa: SLF001 - the test reads the live counters
            while sched.num_running + sched.num_waiting < num_batch:
                await asyncio.sleep(0.005)
            interactive = []
            for i in range(num_interactive):
                interactive.append(await client.generate(OPEN[i], batch_tokens, ignore_eos=True))
            done = await asyncio.gather(*batch)
            preemptions = dict(sched.preemptions)
    for i, r in enumerate(done):
        assert r.finish_reason == "length" and r.token_ids == want[OPEN[i % len(OPEN)]]
    for i, r in enumerate(interactive):
        assert r.token_ids == want[OPEN[i]]
    return preemptions


async def test_batch_gives_way_and_everything_finishes(models):
    preemptions = await flood(models, num_batch=12, batch_tokens=96, num_interactive=3)
    assert preemptions.get("interactive", 0) == 0
    assert preemptions.get("batch", 0) > 0  # the KV cache was too small for the flood


@pytest.mark.slow
def test_priority_bench_under_a_32_request_flood(models, monkeypatch):
    monkeypatch.setenv("SPECMESH_MODEL_DIR", str(models))
    args = argparse.Namespace(
        target=TINY_TARGET, draft=TINY_DRAFT, batch=32, batch_tokens=128, interactive=16,
        interactive_tokens=16, tree=TreeSpec.parse("chain:4"), kv_cache_mb=2.0, gap_s=0.05,
        settle_s=0.5, batch_round_tokens=4, json=False, verbose=False)
    out = asyncio.run(priority_bench.run(args))
    row = out["batch_flood"]
    assert row["preemptions"].get("interactive", 0) == 0 and row["batch_finished"] == 32
    assert row["same_output"] and not row["batch_errors"]
