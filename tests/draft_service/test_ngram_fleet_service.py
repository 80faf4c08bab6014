"""The fleet n-gram table through real services: a model-free draft service with
--ngram-fleet-key, the cache service over a real redis-server, the tiny target. Request A's
continuations reach request B (another sequence): B's proposals carry them, and B's greedy
output is still the target-only output."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from specmesh.cache_service.__main__ import start_server
from specmesh.cache_service.config import CacheServiceConfig
from specmesh.clients.async_client import AsyncSpecMeshClient
from specmesh.v1 import common_pb2, draft_pb2, draft_pb2_grpc
from specmesh.wire.tree_spec import TreeSpec
from tests.conftest import TINY_TARGET
from tests.stack import model_server

pytestmark = [pytest.mark.models, pytest.mark.redis]
A = "Once upon a time, there was a little girl named Lily. She loved to play"
B = "Once upon a time, there was a little boy named Tim. He loved to play"


async def wait_for(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def propose(stub, seq: str, cached: int, new: list[int]) -> list[int]:
    reply = await stub.Propose(draft_pb2.ProposeRequest(
        header=common_pb2.SequenceHeader(sequence_id=seq, num_cached_tokens=cached,
                                         new_tokens=new),
        tree_spec=TreeSpec("chain", chain_length=6).to_proto()), timeout=10)
    return list(reply.tree.tokens)


async def test_request_a_continuations_help_request_b_and_greedy_is_unchanged(
        models, redis_server):
    cache_server, cache_servicer = await start_server(CacheServiceConfig(
        redis_url=redis_server.url))
    cache_addr = f"127.0.0.1:{cache_server.port}"
    target = str(models / TINY_TARGET)
    try:
        async with model_server("verify", models / TINY_TARGET) as (v, _), \
                model_server("draft", None, method="ngram") as (d_local, _), \
                model_server("draft", None, method="ngram", cache_addr=cache_addr,
                             ngram_fleet_key="stories260K-test") as (d, servicer):
            fleet = servicer.ngram.fleet
            async with AsyncSpecMeshClient(v, d_local, target) as alone:
                plain_b = await alone.generate(B, 64, speculate=False)
                local_b = await alone.generate(B, 64, tree="ngram:8")
            async with AsyncSpecMeshClient(v, d, target) as client:
                a = await client.generate(A, 64, tree="ngram:8")
                await client.generate("Hi", 1, tree="ngram:8")  # carries A's release
                await wait_for(lambda: fleet.stats.published > 0)
                b = await client.generate(B, 64, tree="ngram:8")
            assert b.token_ids == plain_b.token_ids  # verify decides: greedy is unchanged
            assert local_b.token_ids == plain_b.token_ids
            assert fleet.stats.contexts_hit > 0 and fleet.stats.proposals_helped > 0
            print("accepted per round, local:", local_b.stats.accepted_per_round,
                  "fleet:", b.stats.accepted_per_round)

            # B's proposal shows A's continuation: a new sequence (no repeats of its own) ends
            # with 4 tokens A generated; once its contexts are fetched, the chain is what
            # followed them in A
            stub = draft_pb2_grpc.DraftServiceStub(grpc.aio.insecure_channel(d))
            gen = list(a.token_ids)
            prompt = [1, *gen[20:24]]
            first = await propose(stub, "c", 0, prompt)
            await wait_for(lambda: tuple(gen[20:24]) in fleet._known)
            assert await propose(stub, "c", len(prompt), []) == gen[24:30]
            assert first in ([], gen[24:30])  # the admission wait may or may not have sufficed
    finally:
        await cache_server.stop(0.1)
        await cache_servicer.close()


async def test_a_fleet_key_needs_the_cache_address():
    with pytest.raises(ValueError, match="cache-addr"):
        async with model_server("draft", None, method="ngram", ngram_fleet_key="x"):
            pass
