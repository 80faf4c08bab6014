"""Build and load our small CPU kernels (`csrc/*.c`) with the system C compiler, once per
source, flags and CPU.

Each library is compiled with `cc -O3 -march=native -fopenmp -shared -fPIC` (plus the
kernel's own flags) into `$SPECMESH_KERNEL_CACHE` (default `~/.cache/specmesh/kernels`), linked
to the OpenMP runtime torch already loaded (one thread team per torch thread), and loaded with
ctypes. Where there is no compiler, the CPU lacks what the source needs (AVX-512), or
`SPECMESH_CPU_KERNELS=0`, `load` returns None and callers keep their PyTorch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import torch

log = logging.getLogger(__name__)

CSRC = pathlib.Path(__file__).resolve().parent / "csrc"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")


def _cache_dir() -> pathlib.Path:
    env = os.environ.get("SPECMESH_KERNEL_CACHE")
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "specmesh" / "kernels"


def _cpu_flags() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _build(compiler: str, source: pathlib.Path, flags: tuple[str, ...]) -> pathlib.Path:
    """Compile (or reuse) `source`; the name covers source, flags and CPU features."""
    torch_lib = pathlib.Path(torch.__file__).resolve().parent / "lib"
    link = (f"-L{torch_lib}", f"-Wl,-rpath,{torch_lib}", "-lm")  # torch's own libgomp
    # every csrc file: a kernel may #include another (layer_f16.c includes three)
    sources = b"".join(p.read_bytes() for p in sorted(CSRC.glob("*.c")) if p != source)
    key = hashlib.sha256(source.read_bytes() + sources
                         + repr((flags, link, _cpu_flags())).encode())
    out = _cache_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_out = pathlib.Path(tmp) / out.name
        subprocess.run([compiler, *flags, str(source), "-o", str(tmp_out), *link],
                       check=True, capture_output=True, text=True, timeout=120)
        os.replace(tmp_out, out)  # atomic: concurrent builders (draft + verify) are fine
    return out


def load(name: str, extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """`csrc/<name>` built and loaded, or None where it cannot be (logged once per caller)."""
    if os.environ.get("SPECMESH_CPU_KERNELS", "1") == "0" or platform.machine() != "x86_64":
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        log.info("no C compiler: CPU kernel %s unavailable", name)
        return None
    try:
        return ctypes.CDLL(str(_build(compiler, CSRC / name, FLAGS + extra_flags)))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        log.info("CPU kernel %s unavailable (%s)", name, str(detail)[-300:])
        return None
