"""The cache service over a real 3-master Redis Cluster (redis-server --cluster-enabled yes on
free ports, joined with redis-cli --cluster create): chunks of one prefix spread over slots and
nodes still read back; a killed master makes misses, never failures."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time

import numpy as np
import pytest

from specmesh.cache_service.__main__ import start_server
from specmesh.cache_service.config import CacheServiceConfig
from specmesh.v1 import cache_pb2, common_pb2
from specmesh.wire.cache_client import CacheClient, result_key
from tests.conftest import free_port

pytestmark = pytest.mark.redis
FP, CHUNK = "fp-cluster", 4


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free and valid too."""
    import socket

    while True:
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


class RedisCluster:
    def __init__(self, tmp, size: int = 3):
        self.ports = [cluster_port() for _ in range(size)]
        self.tmp = tmp
        self.procs: dict[int, subprocess.Popen] = {}

    def start(self) -> None:
        if not (shutil.which("redis-server") and shutil.which("redis-cli")):
            pytest.skip("redis-server / redis-cli not on PATH")
        for port in self.ports:
            d = self.tmp / str(port)
            d.mkdir()
            self.procs[port] = subprocess.Popen(
                ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(d),
                 "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                 "--cluster-node-timeout", "1000", "--save", "", "--appendonly", "no"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for port in self.ports:
            self._wait(["ping"], port, "PONG")
        subprocess.run(["redis-cli", "--cluster", "create",
                        *[f"127.0.0.1:{p}" for p in self.ports], "--cluster-replicas", "0",
                        "--cluster-yes"], check=True, capture_output=True, timeout=60)
        self._wait(["cluster", "info"], self.ports[0], "cluster_state:ok")

    def _wait(self, cmd: list[str], port: int, want: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = subprocess.run(["redis-cli", "-p", str(port), *cmd], capture_output=True,
                                 text=True).stdout
            if want in out:
                return
            time.sleep(0.1)
        raise RuntimeError(f"redis {port}: no {want!r} after {timeout} s")

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"

    def kill(self, port: int) -> None:
        self.procs[port].kill()
        self.procs[port].wait()

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture
def redis_cluster(tmp_path):
    cluster = RedisCluster(tmp_path)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _arrays(n: int) -> list[np.ndarray]:
    return [np.full((2, 2, CHUNK, 1, 4), i, dtype=np.float16) for i in range(n)]


def _key(prompt: list[int]) -> cache_pb2.ResultKey:
    return result_key(target_fingerprint=FP, prompt_token_ids=prompt,
                      sampling=common_pb2.SamplingParams(temperature=0.0), max_new_tokens=4)


async def test_chunks_and_results_over_a_cluster_then_a_dead_master_is_misses(redis_cluster):
    server, servicer = await start_server(CacheServiceConfig(
        redis_url=redis_cluster.url, redis_timeout_s=0.3, retry_after_s=0.2))
    try:
        async with CacheClient(f"127.0.0.1:{server.port}", timeout_s=2.0) as client:
            prompts = [[7, i, *range(20, 20 + 8 * CHUNK)] for i in range(12)]
            for p in prompts:  # 8 chunks each: keys hash to every node
                assert await client.put_chunks(FP, p, CHUNK, 0, _arrays(8)) == 8
                assert await client.put_result(_key(p), [1, 2, 3], "length")
            for p in prompts:
                got = await client.load_prefix(FP, p, CHUNK)
                assert len(got) == 8 and [int(a.flat[0]) for a in got] == list(range(8))
                assert (await client.get_result(_key(p))).token_ids == [1, 2, 3]
            redis_cluster.kill(redis_cluster.ports[1])  # a master dies, no replica takes over
            await asyncio.sleep(0.5)
            outcomes = []
            for p in prompts:  # every call answers (hit or miss), none raises
                outcomes.append(len(await client.load_prefix(FP, p, CHUNK)))
                outcomes.append(await client.get_result(_key(p)) is not None)
            assert len(outcomes) == 2 * len(prompts)
            assert servicer.engine.stats.errors > 0  # the dead node was noticed, as misses
    finally:
        await server.stop(0.1)
        await servicer.close()
