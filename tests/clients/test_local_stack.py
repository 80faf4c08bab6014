"""LocalStack with an embedded cache: redis-server + cache service as subprocesses, wired into
both model services; without redis-server on PATH it runs without the cache."""

from __future__ import annotations

import asyncio
import logging
import os
import socket

import pytest

from specmesh.clients import local_stack
from specmesh.clients.async_client import AsyncSpecMeshClient
from specmesh.clients.local_stack import EmbeddedRedis, LocalStack
from specmesh.wire.cache_client import CacheClient
from tests.conftest import TINY_DRAFT, TINY_TARGET

PROMPT = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the "
          "park. One day")


@pytest.mark.redis
async def test_embedded_redis_starts_and_cleans_up():
    redis = EmbeddedRedis.from_path()
    if redis is None:
        pytest.skip("redis-server not on PATH")
    await redis.start()
    tmp = redis._tmp.name
    with socket.create_connection(("127.0.0.1", redis.port), timeout=1):
        pass
    redis.stop()
    assert redis.proc.poll() is not None
    assert not os.path.exists(tmp)


@pytest.mark.models
@pytest.mark.redis
async def test_stack_with_embedded_cache(models):
    if EmbeddedRedis.from_path() is None:
        pytest.skip("redis-server not on PATH")
    async with LocalStack(models / TINY_TARGET, models / TINY_DRAFT, cache=True) as stack:
        assert stack.cache_addr and stack.redis is not None
        async with AsyncSpecMeshClient(stack.verify_addr, stack.draft_addr,
                                       str(models / TINY_TARGET)) as client, \
                CacheClient(stack.cache_addr, timeout_s=5) as cache:
            first = await client.generate(PROMPT, 16, ignore_eos=True)
            for _ in range(100):  # the chunks are stored in the background
                if (await cache.server_stats()).chunks_written >= 4:
                    break
                await asyncio.sleep(0.05)
            again = await client.generate(PROMPT, 16, ignore_eos=True)
            stats = await cache.server_stats()
        assert again.token_ids == first.token_ids
        assert stats.prefix_hits == 2  # the draft and the verify service
        redis = stack.redis
    assert redis.proc.poll() is not None  # stopped with the stack


@pytest.mark.models
async def test_no_redis_server_means_no_cache(models, monkeypatch, caplog):
    monkeypatch.setattr(local_stack.shutil, "which", lambda name: None)
    with caplog.at_level(logging.WARNING, logger="specmesh.clients.local_stack"):
        async with LocalStack(models / TINY_TARGET, None, cache=True) as stack:
            assert stack.cache_addr is None and list(stack.services) == ["verify"]
    assert "redis-server not found" in caplog.text


@pytest.mark.models
async def test_service_output_readers_leave_the_default_executor_free(models):
    """Each service's stdout is drained on its own thread: with three stacks in one process
    (six services) `asyncio.to_thread` (text prompts are tokenized there) still runs. Readers
    parked in the loop's default executor (min(32, cpus + 4) threads) once starved it."""
    stacks = [LocalStack(models / TINY_TARGET, models / TINY_DRAFT) for _ in range(3)]
    try:
        for stack in stacks:
            await stack.__aenter__()
        loop = asyncio.get_running_loop()
        workers = min(32, (os.cpu_count() or 1) + 4)
        busy = await asyncio.wait_for(asyncio.gather(
            *(asyncio.to_thread(lambda: True) for _ in range(workers))), timeout=10)
        assert all(busy) and loop is asyncio.get_running_loop()
        async with AsyncSpecMeshClient(stacks[-1].verify_addr, stacks[-1].draft_addr,
                                       str(models / TINY_TARGET)) as client:
            result = await asyncio.wait_for(client.generate(PROMPT, 8), timeout=60)
        assert len(result.token_ids) == 8
    finally:
        for stack in stacks:
            await stack.__aexit__(None, None, None)


HOLDER = """
import asyncio, os, sys
from specmesh.clients.local_stack import LocalStack
async def main():
    async with LocalStack(sys.argv[1], sys.argv[2]) as stack:
        print(" ".join(str(p.proc.pid) for p in stack.services.values()), flush=True)
        await asyncio.sleep(600)
asyncio.run(main())
"""


@pytest.mark.models
async def test_a_killed_client_leaves_no_services_behind(models):
    """SIGKILL the process holding a LocalStack: its model services exit too."""
    import signal
    import subprocess
    import sys
    import time

    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(models / TINY_TARGET),
                               str(models / TINY_DRAFT)], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in holder.stdout.readline().split()]
        assert len(pids) == 2
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        deadline = time.monotonic() + 20
        alive = pids
        while alive and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            alive = [p for p in alive if _running(p)]
        assert not alive, f"services {alive} outlived the killed client"
    finally:
        holder.kill()


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.mark.models
@pytest.mark.redis
async def test_ngram_fleet_stack_feeds_the_table_keyed_by_the_target(models):
    """`ngram_fleet=True` (CLI `--ngram-fleet`): the model-free draft service gets
    `--ngram-fleet-key model_key(target)`, its released sequences reach the cache's n-gram
    table, and greedy output stays the target's."""
    from specmesh.clients.model_key import model_key

    if EmbeddedRedis.from_path() is None:
        pytest.skip("redis-server not on PATH")
    target = models / TINY_TARGET
    async with LocalStack(target, None, draft_method="ngram", cache=True,
                          ngram_fleet=True) as stack:
        argv = stack.services["draft"].argv
        assert argv[argv.index("--ngram-fleet-key") + 1] == model_key(target)
        async with AsyncSpecMeshClient(stack.verify_addr, stack.draft_addr,
                                       str(target)) as client, \
                CacheClient(stack.cache_addr, timeout_s=5) as cache:
            plain = await client.generate(PROMPT, 24, speculate=False)
            spec = await client.generate(PROMPT, 24, tree="ngram:8")
            await client.generate("Hi", 1, tree="ngram:8")  # carries the release
            for _ in range(200):  # published in the background
                stats = await cache.server_stats()
                if stats is not None and stats.ngrams_written > 0:
                    break
                await asyncio.sleep(0.05)
            assert stats.ngrams_written > 0
            assert spec.token_ids == plain.token_ids


def test_model_key_names_the_checkpoint(models, tmp_path):
    from specmesh.clients.model_key import model_key

    assert model_key(models / TINY_TARGET) == model_key(models / TINY_TARGET)
    assert model_key(models / TINY_TARGET) != model_key(models / TINY_DRAFT)
    one = tmp_path / "m.gguf"
    one.write_bytes(b"GGUF" + bytes(10))
    key = model_key(one)
    one.write_bytes(b"GGUF" + bytes(9) + b"\x01")
    assert key.startswith("model-") and model_key(one) != key
