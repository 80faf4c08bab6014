"""The client's fault policy: an unreachable verify service ends requests clearly, in time."""

from __future__ import annotations

import asyncio
import time

import pytest

from specmesh.clients.async_client import AsyncSpecMeshClient
from specmesh.clients.types import GenerationParams
from specmesh.wire.errors import SpecMeshError
from tests.conftest import TINY_DRAFT, TINY_TARGET
from tests.stack import model_server, spec_stack


@pytest.mark.models
async def test_verify_gone_for_good_fails_within_the_deadline(models):
    async with model_server("verify", models / TINY_TARGET) as (verify, _):
        client = AsyncSpecMeshClient(verify, None, retry_deadline_s=1.5)
        await client.connect()
    try:  # the server is stopped now
        start = time.monotonic()
        with pytest.raises(SpecMeshError) as info:
            await client.generate([1, 403, 407], params=GenerationParams(max_new_tokens=8))
        assert "UNAVAILABLE" in str(info.value)
        assert time.monotonic() - start < 1.5 + 3.0
    finally:
        await client.close()


@pytest.mark.models
async def test_oversized_prompts_are_refused_before_tokenizing(models):
    from specmesh.wire.errors import InvalidRequest

    async with model_server("verify", models / TINY_TARGET) as (verify, _), \
            AsyncSpecMeshClient(verify, None, str(models / TINY_TARGET)) as client:
        with pytest.raises(InvalidRequest) as info:
            await client.generate("word " * 1_000_000, params=GenerationParams(max_new_tokens=4))
        assert info.value.field == "prompt" and "bytes" in str(info.value)
        with pytest.raises(InvalidRequest):
            await client.generate([1] * 10_000, params=GenerationParams(max_new_tokens=4))
        ok = await client.generate("Once upon a time", params=GenerationParams(max_new_tokens=4))
        assert len(ok.token_ids) == 4


@pytest.mark.models
async def test_a_scheduling_bug_fails_its_requests_and_the_loop_goes_on(models, monkeypatch):
    """An exception while planning a round (here the speculation policy's, once) fails the
    requests of that moment with it; the client's loop lives on and serves the next ones
    (it used to die with the exception, leaving every request waiting forever)."""
    from specmesh.clients.batch_loop import PerRequestPolicy

    calls = {"n": 0}
    real = PerRequestPolicy.choose

    def broken_once(self, *args, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("policy bug")
        return real(self, *args, **kw)

    monkeypatch.setattr(PerRequestPolicy, "choose", broken_once)
    params = GenerationParams(max_new_tokens=6)
    async with spec_stack(models / TINY_TARGET, models / TINY_DRAFT) as (verify, draft), \
            AsyncSpecMeshClient(verify, draft) as client:
        with pytest.raises(RuntimeError, match="policy bug"):
            await asyncio.wait_for(client.generate([1, 403, 407], params=params), 30)
        again = await asyncio.wait_for(client.generate([1, 403, 407], params=params), 30)
        assert len(again.token_ids) == 6
