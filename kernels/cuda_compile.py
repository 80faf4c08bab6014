"""CUDA tree attention, part 1 of 3: compiling `csrc/tree_attention.cu` with NVRTC.

One (dtype, head_dim) configuration at a time, for the current device's architecture, on first
use, through cuda-python. Importing this never compiles anything and never needs cuda-python, a
toolkit or a GPU; using it without them raises `CudaUnavailable`.
"""

from __future__ import annotations

import functools
import pathlib
import re
from dataclasses import dataclass

import torch

SOURCE_PATH = pathlib.Path(__file__).parent / "csrc" / "tree_attention.cu"
DTYPE_NAMES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
HEAD_DIMS = tuple(range(32, 257, 32))


class CudaUnavailable(RuntimeError):
    """The CUDA kernel cannot run here (no cuda-python/NVRTC/GPU); use the PyTorch reference."""


class KernelCompileError(CudaUnavailable):
    """NVRTC rejected the source (or the architecture); `log` holds its output."""

    def __init__(self, message: str, log: str = ""):
        super().__init__(f"{message}\n{log}".rstrip())
        self.log = log


class UnsupportedInput(CudaUnavailable):
    """The kernel does not cover these tensors (dtype, head_dim, layout); use the reference."""


def _bindings():
    """(driver, nvrtc) from cuda-python, imported on first use."""
    try:
        from cuda.bindings import driver, nvrtc
    except ImportError:
        try:  # cuda-python < 12.6
            from cuda import cuda as driver  # type: ignore[no-redef]
            from cuda import nvrtc  # type: ignore[no-redef]
        except ImportError as exc:
            raise CudaUnavailable(
                "cuda-python is not installed (pip install 'specmesh[cuda]')") from exc
    return driver, nvrtc


def _check_nvrtc(nvrtc, result, what: str):
    err = result[0]
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise KernelCompileError(f"NVRTC {what} failed: {err!r}")
    return result[1] if len(result) == 2 else result[1:]


def _check_driver(driver, result, what: str):
    err = result[0]
    if err != driver.CUresult.CUDA_SUCCESS:
        _, name = driver.cuGetErrorName(err)
        raise RuntimeError(f"CUDA driver {what} failed: {name.decode() if name else err!r}")
    return result[1] if len(result) == 2 else None


# ------------------------------------------------------------------------------- compilation


@dataclass(frozen=True)
class CompiledProgram:
    arch: str  # "sm_90" (image is a cubin) or "compute_90" (image is PTX)
    image: bytes
    log: str  # NVRTC's log; empty for a clean build


@functools.lru_cache(maxsize=None)
def compile_program(arch: str, dtype: str | None = None,
                    head_dim: int | None = None) -> CompiledProgram:
    """Compile the kernel source with NVRTC for `arch`; with `dtype` ("f32", "f16", "bf16") and
    `head_dim`, only that configuration (what a device loads), otherwise every configuration."""
    if not re.fullmatch(r"(sm|compute)_\d+[af]?", arch):
        raise ValueError(f"arch {arch!r}: expected e.g. 'sm_90' or 'compute_90'")
    if (dtype is None) != (head_dim is None):
        raise ValueError("dtype and head_dim go together")
    _, nvrtc = _bindings()
    options = [f"--gpu-architecture={arch}", "-std=c++17"]
    if dtype is not None:
        if dtype not in DTYPE_NAMES.values() or head_dim not in HEAD_DIMS:
            raise ValueError(f"no kernel for dtype={dtype!r} head_dim={head_dim}")
        options += [f"-DSPECMESH_DTYPE={dtype}", f"-DSPECMESH_HEAD_DIM={head_dim}"]
    try:
        prog = _check_nvrtc(nvrtc, nvrtc.nvrtcCreateProgram(
            SOURCE_PATH.read_bytes(), SOURCE_PATH.name.encode(), 0, [], []), "create")
    except CudaUnavailable:
        raise
    except (OSError, RuntimeError) as exc:  # libnvrtc not found by cuda-bindings
        raise CudaUnavailable(f"NVRTC is not available: {exc}") from exc
    try:
        encoded = [o.encode() for o in options]
        compiled = nvrtc.nvrtcCompileProgram(prog, len(encoded), encoded)
        log_size = _check_nvrtc(nvrtc, nvrtc.nvrtcGetProgramLogSize(prog), "log size")
        log_buf = b" " * log_size
        _check_nvrtc(nvrtc, nvrtc.nvrtcGetProgramLog(prog, log_buf), "log")
        log = log_buf.rstrip(b"\x00").decode(errors="replace").strip()
        if compiled[0] != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise KernelCompileError(f"NVRTC could not compile {SOURCE_PATH.name} for {arch}", log)
        if arch.startswith("sm_"):
            size = _check_nvrtc(nvrtc, nvrtc.nvrtcGetCUBINSize(prog), "cubin size")
            image = b" " * size
            _check_nvrtc(nvrtc, nvrtc.nvrtcGetCUBIN(prog, image), "cubin")
        else:
            size = _check_nvrtc(nvrtc, nvrtc.nvrtcGetPTXSize(prog), "ptx size")
            image = b" " * size
            _check_nvrtc(nvrtc, nvrtc.nvrtcGetPTX(prog, image), "ptx")
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    return CompiledProgram(arch=arch, image=image, log=log)


def compile_source(arch: str) -> bytes:
    """Every kernel configuration compiled for `arch`: a cubin for sm_XX, PTX for compute_XX."""
    return compile_program(arch).image


def compile_log(arch: str) -> str:
    """NVRTC's log of `compile_source(arch)` (warnings; empty when clean)."""
    return compile_program(arch).log
