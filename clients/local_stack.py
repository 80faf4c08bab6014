"""Start services as local subprocesses on free ports, wait for SERVING, stop them after.

    async with LocalStack(target_dir, draft_dir, cache=True) as stack:
        stack.verify_addr, stack.draft_addr, stack.cache_addr

With `cache=True` the stack also runs a cache service (prefix KV for both model services, and
`stack.cache_addr` for a client's result cache) over `redis_url`, or, without one, over an
embedded `redis-server` from PATH (free port, temporary directory, no persistence, 256 MB with
LRU eviction) that stops with the stack. No redis-server on PATH: a warning, and no cache.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

from specmesh.wire.server import wait_for_serving

log = logging.getLogger(__name__)


@dataclass
class ServiceProcess:
    name: str
    argv: list[str]
    proc: subprocess.Popen | None = None
    address: str = ""
    startup_lines: list[str] = field(default_factory=list)  # what it printed until listening

    async def start(self, timeout: float = 120.0) -> None:
        # the child exits when this process dies (specmesh.wire.server.die_with_parent)
        env = dict(os.environ, PYTHONUNBUFFERED="1", SPECMESH_PARENT_PID=str(os.getpid()))
        self.proc = subprocess.Popen([sys.executable, "-m", *self.argv], stdout=subprocess.PIPE,
                                     stderr=None, text=True, env=env)
        loop = asyncio.get_running_loop()
        listening = loop.create_future()
        # its own daemon thread, not the loop's default executor: one blocked reader per service
        # there would starve asyncio.to_thread (tokenizing) once a process runs a few stacks
        threading.Thread(target=self._read, args=(loop, listening), daemon=True,
                         name=f"{self.name}-stdout").start()
        line = await asyncio.wait_for(listening, timeout)
        self.address = line.rsplit(" ", 1)[-1]
        await wait_for_serving(self.address, timeout)

    def _read(self, loop: asyncio.AbstractEventLoop, listening: asyncio.Future) -> None:
        """Hand the listening line to `listening`, then drain stdout until the process ends."""
        def settle(fn, value) -> None:
            if not listening.done():
                fn(value)
        for line in self.proc.stdout:
            if not listening.done():
                self.startup_lines.append(line.strip())
            if not listening.done() and (" listening on " in line or line.startswith("SERVING ")):
                loop.call_soon_threadsafe(settle, listening.set_result, line.strip())
        error = RuntimeError(f"{self.name} exited with {self.proc.wait()} before listening")
        if not loop.is_closed():
            loop.call_soon_threadsafe(settle, listening.set_exception, error)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class EmbeddedRedis:
    """A throwaway redis-server: free port, own temporary directory, no persistence, LRU."""

    ARGS = ("--save", "", "--appendonly", "no", "--maxmemory", "256mb",
            "--maxmemory-policy", "allkeys-lru")

    def __init__(self, binary: str):
        self.binary = binary
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None

    @classmethod
    def from_path(cls) -> "EmbeddedRedis | None":
        """One over the `redis-server` on PATH; None when there is none."""
        binary = shutil.which("redis-server")
        return cls(binary) if binary else None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self, timeout: float = 10.0, attempts: int = 3) -> None:
        """Start on a free port (again on another one if it was taken meanwhile)."""
        self._tmp = tempfile.TemporaryDirectory(prefix="specmesh-redis-")
        for _ in range(attempts):
            self.port = _free_port()
            self.proc = subprocess.Popen(
                [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                 "--dir", self._tmp.name, *self.ARGS],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if await self._accepting(timeout):
                return
            self.stop_process()
        self.stop()
        raise RuntimeError(f"redis-server did not start ({attempts} attempts)")

    async def _accepting(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return True
            except OSError:
                await asyncio.sleep(0.05)
        return False

    def stop_process(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def stop(self) -> None:
        self.stop_process()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalStack:
    target_dir: pathlib.Path
    draft_dir: pathlib.Path | None
    extra_verify_args: list[str] = field(default_factory=list)
    extra_draft_args: list[str] = field(default_factory=list)
    cache: bool = False
    """Run a cache service too (prefix KV for both model services, result cache for clients)."""
    redis_url: str | None = None
    """Redis for the cache service; None = an embedded redis-server from PATH."""
    extra_cache_args: list[str] = field(default_factory=list)
    services: dict[str, ServiceProcess] = field(default_factory=dict)
    redis: EmbeddedRedis | None = field(default=None, init=False, repr=False)

    @property
    def verify_addr(self) -> str:
        return self.services["verify"].address

    @property
    def draft_addr(self) -> str | None:
        return self.services["draft"].address if "draft" in self.services else None

    @property
    def cache_addr(self) -> str | None:
        """host:port of the cache service; None when the stack runs without one."""
        return self.services["cache"].address if "cache" in self.services else None

    async def __aenter__(self) -> "LocalStack":
        try:
            cache_args = await self._start_cache() if self.cache else []
            self.services["verify"] = ServiceProcess("verify", [
                "verify_service", "--model", str(self.target_dir), "--port", "0",
                *cache_args, *self.extra_verify_args])
            if self.draft_dir is not None:
                self.services["draft"] = ServiceProcess("draft", [
                    "draft_service", "--model", str(self.draft_dir), "--port", "0",
                    *cache_args, *self.extra_draft_args])
            await asyncio.gather(*(s.start() for name, s in self.services.items()
                                   if name != "cache"))
        except BaseException:
            self.stop()
            raise
        return self

    async def _start_cache(self) -> list[str]:
        """Start Redis (unless given) and the cache service; the model services' flags."""
        url = self.redis_url
        if url is None:
            self.redis = EmbeddedRedis.from_path()
            if self.redis is None:
                log.warning("redis-server not found on PATH: running without the cache "
                            "(install Redis or pass a Redis URL)")
                return []
            await self.redis.start()
            url = self.redis.url
        cache = ServiceProcess("cache", ["cache_service", "--redis-url", url, "--port", "0",
                                         *self.extra_cache_args])
        self.services["cache"] = cache
        await cache.start()
        return ["--cache-addr", cache.address]

    async def __aexit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """Model services first, then the cache service, then the embedded Redis."""
        for name in sorted(self.services, key=lambda n: n == "cache"):
            self.services[name].stop()
        if self.redis is not None:
            self.redis.stop()
