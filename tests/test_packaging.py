"""The installed distribution's top-level names resolve to this repository."""

from __future__ import annotations

import importlib
import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name,where", [
    ("specmesh", "protos/specmesh"), ("specmesh.v1.verify_pb2", "protos/specmesh/v1"),
    ("specmesh.wire", "protos/specmesh/wire"), ("kernels", "kernels"),
    ("model_service", "model_service"),
    ("draft_service", "draft_service"), ("verify_service", "verify_service"),
    ("clients", "clients"),
])
def test_top_level_names_resolve_here(name, where):
    mod = importlib.import_module(name)
    assert pathlib.Path(mod.__file__).resolve().parent == (REPO / where).resolve()


def test_console_script_is_installed():
    exe = shutil.which("specmesh")
    assert exe, "pip install -e . should put `specmesh` on PATH"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "generate" in out.stdout


def test_generated_stubs_are_fresh():
    out = subprocess.run([sys.executable, str(REPO / "protos" / "generate.py"), "--check"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
