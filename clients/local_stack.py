"""Start services as local subprocesses on free ports, wait for SERVING, stop them after.

    async with LocalStack(draft_dir, target_dir) as stack:
        stack.verify_addr, stack.draft_addr
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import subprocess
import sys
from dataclasses import dataclass, field

from specmesh.wire.server import wait_for_serving


@dataclass
class ServiceProcess:
    name: str
    argv: list[str]
    proc: subprocess.Popen | None = None
    address: str = ""

    async def start(self, timeout: float = 120.0) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-m", *self.argv], stdout=subprocess.PIPE,
                                     stderr=None, text=True, env=env)
        line = await asyncio.wait_for(asyncio.to_thread(self._listening_line), timeout)
        self.address = line.rsplit(" ", 1)[-1]
        await wait_for_serving(self.address, timeout)
        asyncio.get_running_loop().run_in_executor(None, self._drain)

    def _listening_line(self) -> str:
        for line in self.proc.stdout:
            if " listening on " in line or line.startswith("SERVING "):
                return line.strip()
        raise RuntimeError(f"{self.name} exited with {self.proc.wait()} before listening")

    def _drain(self) -> None:
        for _ in self.proc.stdout:
            pass

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class LocalStack:
    target_dir: pathlib.Path
    draft_dir: pathlib.Path | None
    extra_verify_args: list[str] = field(default_factory=list)
    extra_draft_args: list[str] = field(default_factory=list)
    services: dict[str, ServiceProcess] = field(default_factory=dict)

    @property
    def verify_addr(self) -> str:
        return self.services["verify"].address

    @property
    def draft_addr(self) -> str | None:
        return self.services["draft"].address if "draft" in self.services else None

    async def __aenter__(self) -> "LocalStack":
        self.services["verify"] = ServiceProcess("verify", [
            "verify_service", "--model", str(self.target_dir), "--port", "0",
            *self.extra_verify_args])
        if self.draft_dir is not None:
            self.services["draft"] = ServiceProcess("draft", [
                "draft_service", "--model", str(self.draft_dir), "--port", "0",
                *self.extra_draft_args])
        try:
            await asyncio.gather(*(s.start() for s in self.services.values()))
        except BaseException:
            self.stop()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        for s in self.services.values():
            s.stop()
