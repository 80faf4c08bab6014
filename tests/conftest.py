"""Shared fixtures: model folders, a real redis-server on a free port, GPU skipping."""

from __future__ import annotations

import os
import pathlib
import shutil
import socket
import subprocess
import time

import pytest

from specmesh.kernels.hf_import import installed_kernels_first

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_MODEL_DIR = REPO.parent / "shared" / "models"

# the root's kernels/ must not shadow Hugging Face's `kernels` (transformers imports it); child
# processes skip the working directory altogether
os.environ.setdefault("PYTHONSAFEPATH", "1")
installed_kernels_first()

TINY_TARGET = "stories260K"
TINY_DRAFT = "stories260K-draft2L"
WIDE_TARGET = "stories260K-wide78M"
WIDE_DRAFT = "stories260K-draft2L-wide5M"


def model_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("SPECMESH_MODEL_DIR", DEFAULT_MODEL_DIR)).resolve()


@pytest.fixture(scope="session")
def models() -> pathlib.Path:
    """The folder holding the model pairs; skips when it is absent."""
    d = model_dir()
    if not (d / TINY_TARGET / "config.json").exists():
        pytest.skip(f"models not found under {d} (set SPECMESH_MODEL_DIR)")
    return d


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisProcess:
    """A real redis-server on a free port with its own temporary directory."""

    def __init__(self, tmp: pathlib.Path):
        self.port = free_port()
        self.tmp = tmp
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server not on PATH")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.tmp),
             "--save", "", "--appendonly", "no", "--maxmemory", "256mb",
             "--maxmemory-policy", "allkeys-lru"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


@pytest.fixture
def redis_server(tmp_path):
    """A fresh redis-server per test (function scope, so a test may kill it)."""
    server = RedisProcess(tmp_path)
    server.start()
    yield server
    server.stop()
