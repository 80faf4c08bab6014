"""Faults with real processes: kill -9 the draft, the cache service, Redis, or the verify service
(then restart it on its port) in the middle of a generation. The output is identical to an
undisturbed run; only speed may suffer."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from specmesh.clients.async_client import AsyncSpecMeshClient
from specmesh.clients.local_stack import LocalStack, ServiceProcess
from specmesh.clients.types import GenerationParams
from specmesh.wire.tree_spec import TreeSpec
from tests.conftest import TINY_DRAFT, TINY_TARGET

pytestmark = pytest.mark.models
PROMPT = [1, 403, 407, 261]
PARAMS = GenerationParams(max_new_tokens=360, ignore_eos=True, tree=TreeSpec.parse("chain:3"))


async def generate_with_fault(client: AsyncSpecMeshClient, fault, after_events: int = 5):
    """Stream a generation; call `fault()` after a few events; return the token ids."""
    ids, seen = [], 0
    async for ev in client.stream(PROMPT, params=PARAMS):
        ids += ev.token_ids
        seen += 1
        if seen == after_events:
            await fault()
    return ids


def kill9(proc) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


async def run_case(models, kill: str) -> None:
    async with LocalStack(models / TINY_TARGET, models / TINY_DRAFT, cache=True) as stack, \
            AsyncSpecMeshClient(stack.verify_addr, stack.draft_addr,
                                retry_deadline_s=60) as client:
        reference = (await client.generate(PROMPT, params=PARAMS)).token_ids

        async def fault() -> None:
            if kill == "redis":
                kill9(stack.redis.proc)
                return
            victim = stack.services[kill]
            kill9(victim.proc)
            if kill == "verify":  # comes back on the same port, with no state
                port = victim.address.rsplit(":", 1)[1]
                argv = [a if a != "0" else port for a in victim.argv]
                stack.services[kill] = ServiceProcess(kill, argv)
                await stack.services[kill].start()
        got = await generate_with_fault(client, fault)
        assert got == reference


@pytest.mark.parametrize("kill", ["draft", "cache", "redis", "verify"])
async def test_kill_9_mid_run_keeps_the_output(models, kill):
    await asyncio.wait_for(run_case(models, kill), 180)
