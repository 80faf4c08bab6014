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

from specmesh.clients.local_pki import LocalSecrets
from specmesh.clients.model_key import model_key
from specmesh.wire.progress import progress
from specmesh.wire.security import Security
from specmesh.wire.server import wait_for_serving

log = logging.getLogger(__name__)


@dataclass
class ServiceProcess:
    name: str
    argv: list[str]
    proc: subprocess.Popen | None = None
    address: str = ""
    startup_lines: list[str] = field(default_factory=list)  # what it printed until listening
    security: Security | None = None  # to check its health over TLS

    async def start(self, timeout: float = 120.0) -> None:
        # the child exits when this process dies (specmesh.wire.server.die_with_parent)
        # quiet children: several processes' bars on one terminal garble (the stack shows one)
        # PYTHONSAFEPATH: run from a checkout, the working directory's folders (kernels/, ...)
        # must not shadow installed packages (Hugging Face's `kernels`); ours are specmesh.*
        env = dict(os.environ, PYTHONUNBUFFERED="1", SPECMESH_PARENT_PID=str(os.getpid()),
                   SPECMESH_PROGRESS="0", PYTHONSAFEPATH="1")
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
        await wait_for_serving(self.address, timeout, self.security)

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

    def printed(self, prefix: str) -> str | None:
        """The last word of the first startup line that starts with `prefix` (an URL, a port)."""
        return next((line.rsplit(" ", 1)[-1] for line in self.startup_lines
                     if line.startswith(prefix)), None)

    @property
    def metrics_url(self) -> str | None:
        """http://host:port/metrics when the service serves metrics."""
        return self.printed("metrics on ")

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
    """The draft model; None: no draft service, unless draft_method is "ngram"."""
    draft_method: str = "model"
    """"ngram": a model-free draft service (n-gram lookup; draft_dir unused)."""
    extra_verify_args: list[str] = field(default_factory=list)
    extra_draft_args: list[str] = field(default_factory=list)
    cache: bool = False
    """Run a cache service too (prefix KV for both model services, result cache for clients)."""
    redis_url: str | None = None
    """Redis for the cache service; None = an embedded redis-server from PATH."""
    extra_cache_args: list[str] = field(default_factory=list)
    device: str = "cpu"
    """torch device of both model services ('cuda', 'cuda:1')."""
    dtype: str | None = None
    """Weights/KV dtype of both model services (float32, float16, bfloat16); None = theirs."""
    ngram_fleet: bool = False
    """The draft service also reads and feeds the fleet n-gram table in the cache service's
    Redis, keyed by `model_key(target_dir)` (needs the cache; ignored without one)."""
    metrics_port: int | None = None
    """Serve every service's metrics: 0 = a free port each; N = gateway N (see `metrics_args`),
    verify N+1, draft N+2, cache N+3. None = no metrics."""
    metrics_host: str = "127.0.0.1"
    quiet: bool = False
    """No progress bar while the services start (always none when stderr is not a terminal)."""
    secure: bool = False
    """TLS, bearer tokens and a cache MAC key, from a throwaway CA and secrets made for this
    stack (`self.secrets`; `self.client_security()` for its clients)."""
    secrets: LocalSecrets | None = field(default=None, init=False, repr=False)
    _secrets_dir: tempfile.TemporaryDirectory | None = field(default=None, init=False,
                                                             repr=False)
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

    def model_args(self) -> list[str]:
        """The --device/--dtype flags both model services take."""
        return ["--device", self.device] + (["--dtype", self.dtype] if self.dtype else [])

    def security_args(self) -> list[str]:
        """The TLS / token / cache-key flags every service (and a gateway) of the stack takes."""
        return self.secrets.service_flags() if self.secrets is not None else []

    def client_security(self) -> Security | None:
        """How a client reaches this stack (its CA and the client token); None if not secure."""
        return self.secrets.client() if self.secrets is not None else None

    def service_security(self) -> Security | None:
        return self.secrets.service() if self.secrets is not None else None

    def metrics_args(self, name: str) -> list[str]:
        """The `--metrics-port/--metrics-host` flags for service `name` (none without metrics)."""
        if self.metrics_port is None:
            return []
        offset = ("gateway", "verify", "draft", "cache").index(name)
        port = self.metrics_port + offset if self.metrics_port else 0
        return ["--metrics-port", str(port), "--metrics-host", self.metrics_host]

    @property
    def metrics_urls(self) -> dict[str, str]:
        """service name -> its metrics URL, for every running service that serves metrics."""
        return {name: s.metrics_url for name, s in self.services.items() if s.metrics_url}

    async def __aenter__(self) -> "LocalStack":
        try:
            if self.secure:
                self._secrets_dir = tempfile.TemporaryDirectory(prefix="specmesh-pki-")
                self.secrets = LocalSecrets.create(self._secrets_dir.name)
            cache_args = await self._start_cache() if self.cache else []
            self.services["verify"] = ServiceProcess("verify", [
                "specmesh.verify_service", "--model", str(self.target_dir), "--port", "0",
                *cache_args, *self.metrics_args("verify"), *self.security_args(),
                *self.model_args(), *self.extra_verify_args], security=self.service_security())
            if self.draft_method == "ngram" or self.draft_dir is not None:
                what = (["--method", "ngram"] if self.draft_method == "ngram"
                        else ["--model", str(self.draft_dir)])
                if self.ngram_fleet and cache_args:
                    what += ["--ngram-fleet-key", model_key(self.target_dir)]
                self.services["draft"] = ServiceProcess("draft", [
                    "specmesh.draft_service", *what, "--port", "0",
                    *cache_args, *self.metrics_args("draft"), *self.security_args(),
                    *self.model_args(), *self.extra_draft_args],
                    security=self.service_security())
            starting = [s for name, s in self.services.items() if name != "cache"]
            with progress(total=len(starting), desc="starting services", unit="service",
                          quiet=self.quiet) as bar:
                async def start(service: ServiceProcess) -> None:
                    await service.start()
                    bar.update(1)
                await asyncio.gather(*(start(s) for s in starting))
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
        cache = ServiceProcess("cache", ["specmesh.cache_service", "--redis-url", url, "--port",
                                         "0", *self.metrics_args("cache"),
                                         *self.security_args(), *self.extra_cache_args],
                               security=self.service_security())
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
        if self._secrets_dir is not None:
            self._secrets_dir.cleanup()
            self._secrets_dir = None
