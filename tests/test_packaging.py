"""The distribution installs one name, `specmesh`, whose layers resolve to this repository."""

from __future__ import annotations

import importlib
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


LAYERS = ("kernels", "model_service", "draft_service", "verify_service", "cache_service",
          "clients", "loadtest")


@pytest.mark.parametrize("name,where", [
    ("specmesh", "protos/specmesh"), ("specmesh.v1.verify_pb2", "protos/specmesh/v1"),
    ("specmesh.wire", "protos/specmesh/wire"),
    *[(f"specmesh.{layer}", layer) for layer in LAYERS],
])
def test_names_resolve_here(name, where):
    mod = importlib.import_module(name)
    assert pathlib.Path(mod.__file__).resolve().parent == (REPO / where).resolve()


def test_the_wheel_installs_one_top_level_name(tmp_path):
    """Only `specmesh` (and its dist-info) lands in site-packages: no `kernels`, `clients`, ...
    (`kernels` is also Hugging Face's kernel-hub package; the two must not overwrite each other)."""
    src = tmp_path / "src"  # a copy: building writes build/ beside the sources
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "tests", "docs"))
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
         "-w", str(tmp_path), str(src)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    (wheel,) = tmp_path.glob("specmesh-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"specmesh"}, sorted(tops)
    for layer in LAYERS:  # every layer is inside, with its package data
        assert f"specmesh/{layer}/__init__.py" in names, layer
    assert any(n.startswith("specmesh/kernels/csrc/") and n.endswith(".cu") for n in names)
    assert "specmesh/v1/verify.proto" in names
    (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")] or [None]
    if top_level:
        with zipfile.ZipFile(wheel) as zf:
            assert zf.read(top_level).decode().split() == ["specmesh"]


def test_console_script_is_installed():
    exe = shutil.which("specmesh")
    assert exe, "pip install -e . should put `specmesh` on PATH"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "generate" in out.stdout


def test_generated_stubs_are_fresh():
    out = subprocess.run([sys.executable, str(REPO / "protos" / "generate.py"), "--check"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
