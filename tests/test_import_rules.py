"""DESIGN.md §1 import rules, checked by parsing every module's imports."""

from __future__ import annotations

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
OURS = {"specmesh", "kernels", "model_service", "draft_service", "verify_service",
        "cache_service", "clients", "loadtest"}
SERVICES = {"draft_service", "verify_service", "cache_service"}


def package_files(pkg: str) -> list[pathlib.Path]:
    root = REPO / "protos" / "specmesh" if pkg == "specmesh" else REPO / pkg
    return [p for p in root.rglob("*.py")]


def layer_of(module: str) -> str:
    """`specmesh.kernels.model` -> "kernels"; `specmesh.wire.x` -> "specmesh" (the contract);
    anything else -> its top-level name (`torch`, `grpc`, or a bare `kernels` that must not be)."""
    parts = module.split(".")
    if parts[0] == "specmesh" and len(parts) > 1 and parts[1] in OURS:
        return parts[1]
    return parts[0]


def imported_modules(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    mods = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            mods.add(node.module)
    return mods


def imported_tops(path: pathlib.Path) -> set[str]:
    return {layer_of(m) for m in imported_modules(path)}


def forbidden_for(pkg: str, path: pathlib.Path) -> set[str]:
    if pkg == "specmesh":
        return OURS - {"specmesh"} | {"torch"}
    if pkg == "kernels":
        return {"grpc", "grpc_health", "grpc_reflection", "specmesh"} | (OURS - {"kernels"})
    if pkg == "model_service":  # the layer the draft and verify services share
        return SERVICES | {"clients", "loadtest"}
    if pkg == "clients":
        return {"torch", "kernels", "model_service"} | SERVICES
    if pkg in SERVICES:
        banned = SERVICES - {pkg}
        if pkg == "cache_service":
            banned |= {"torch", "kernels", "model_service"}
        if path.name == "engine.py":
            banned |= {"grpc"}
        return banned
    return set()


def test_the_contract_root_reexports_the_user_api_lazily():
    """`from specmesh import Client` works, yet importing the contract loads no client code."""
    import subprocess
    import sys

    code = ("import sys, specmesh, specmesh.v1.verify_pb2, specmesh.wire.errors; "
            "heavy = [m for m in sys.modules if m.startswith(('specmesh.clients', 'torch'))]; "
            "assert not heavy, sorted(heavy); "
            "from specmesh import AsyncClient, Client, GenerationParams, launch; "
            "assert GenerationParams().max_new_tokens > 0")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("pkg", sorted(OURS))
def test_import_rules(pkg):
    bad = []
    for path in package_files(pkg):
        found = imported_tops(path) & forbidden_for(pkg, path)
        if found:
            bad.append(f"{path.relative_to(REPO)} imports {sorted(found)}")
    assert not bad, "\n".join(bad)


def test_layers_are_imported_through_the_specmesh_namespace():
    """`kernels`, `clients`, ... exist only as `specmesh.kernels`, `specmesh.clients`, ...: a bare
    `from kernels import x` would load a second copy (or Hugging Face's `kernels` package)."""
    bare = OURS - {"specmesh"}
    bad = []
    for path in sorted(REPO.rglob("*.py")):
        if ".git" in path.parts:
            continue
        found = {m for m in imported_modules(path) if m.split(".")[0] in bare}
        if found:
            bad.append(f"{path.relative_to(REPO)} imports {sorted(found)}")
    assert not bad, "\n".join(bad)


def test_every_package_checked_has_files():
    for pkg in ("specmesh", "kernels", "model_service", "draft_service", "verify_service",
                "clients"):
        assert package_files(pkg), pkg
