"""The CUDA tree-attention kernel, run on the CPU, against the PyTorch reference (no GPU needed).

`kernels/csrc/tree_attention.cu` is compiled UNCHANGED by g++ (>= 12) on top of
tests/kernels/emu/cuda_emu.h, a stand-in for the CUDA keywords and intrinsics: every CUDA thread
is a fiber with its own registers and stack, `__syncthreads` and the warp shuffles are real
barriers (the shuffles exchange values through a per-warp buffer), threads run between barriers in
a seeded random order, shared memory is poisoned with NaNs before every block and deadlocks are
reported. The launches are planned and parameterised by the real host code
(`kernels._cuda.run_tree_attention`, `plan_launch`, `query_tiles`, the `TreeAttentionParams`
ctypes mirror) through a `KernelLauncher` that calls the CPU build instead of the driver.

This checks the kernel's arithmetic, indexing, masking, GQA / query tiling, split-K and combine,
and the fp16 / bf16 conversions on every CI machine; what it cannot check (real warp scheduling,
memory coalescing, NVRTC itself, speed) is left to test_cuda_kernel.py / test_cuda_compile.py.
Tolerances are test_cuda_kernel.py's. Skipped (with the reason) when no g++ >= 12 is found
(or off Linux). How the emulation works, and its limits: tests/kernels/emu/cuda_emu.h.
"""

from __future__ import annotations

import ctypes
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from specmesh.kernels import _cuda
from specmesh.kernels.reference import tree_attention_reference
from tests.kernels.test_cuda_kernel import TOLERANCES
from tests.kernels.test_tree_attention_reference import make_batch

EMU_DIR = pathlib.Path(__file__).resolve().parent / "emu"
MIN_GCC = 12
COMPILERS = ("g++", "g++-14", "g++-13", "g++-12")
# OS threads running blocks (each runs one block's CUDA threads as fibers); the CPUs we may use
WORKERS = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2, 8)


def _find_gxx() -> tuple[str | None, str]:
    """(path of a g++ >= 12, or None; what was found instead)."""
    seen = []
    for name in COMPILERS:
        path = shutil.which(name)
        if path is None:
            continue
        try:
            version = subprocess.run([path, "-dumpfullversion", "-dumpversion"],
                                     capture_output=True, text=True, timeout=30).stdout.strip()
            banner = subprocess.run([path, "--version"], capture_output=True, text=True,
                                    timeout=30).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            seen.append(f"{name}: {exc}")
            continue
        major = re.match(r"(\d+)", version)
        if "clang" in banner.lower() or major is None:
            seen.append(f"{name} is not GCC ({banner.splitlines()[0] if banner else version})")
        elif int(major.group(1)) < MIN_GCC:
            seen.append(f"{name} {version}")
        else:
            return path, ""
    return None, ", ".join(seen) or "no g++ on PATH"


class EmulatedKernels:
    """The CPU build of tree_attention.cu (a shared library) loaded with ctypes."""

    def __init__(self, path: pathlib.Path):
        self.lib = lib = ctypes.CDLL(str(path))
        lib.emu_launch_attention.argtypes = [
            ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint,
            ctypes.c_size_t, ctypes.POINTER(_cuda.TreeAttentionParams), ctypes.c_uint,
            ctypes.c_int]
        lib.emu_launch_combine.argtypes = [
            ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint] + [ctypes.c_void_p] * 4 + [
            ctypes.c_int] * 3 + [ctypes.c_uint, ctypes.c_int]
        lib.emu_last_error.restype = ctypes.c_char_p
        lib.emu_params_layout.argtypes = [ctypes.POINTER(ctypes.c_longlong), ctypes.c_int]
        lib.emu_selftest.argtypes = [ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint,
                                     ctypes.c_void_p, ctypes.c_int, ctypes.c_uint]
        for name in ("emu_f16_to_float", "emu_float_to_f16", "emu_bf16_to_float",
                     "emu_float_to_bf16"):
            getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_longlong]

    def function(self, name: str) -> int:
        """Address of an extern "C" kernel, by the name the CUDA driver looks it up with."""
        return ctypes.cast(getattr(self.lib, name), ctypes.c_void_p).value

    def check(self, rc: int, what: str) -> None:
        if rc != 0:
            raise AssertionError(f"{what}: {self.lib.emu_last_error().decode()}")


class EmulatedLauncher:
    """A kernels._cuda.KernelLauncher running the kernels in the CPU build; outputs are poisoned
    with NaN bytes first, so an element the kernel fails to write cannot pass."""

    num_sms = 132  # an H100: plan_launch chooses split-K as it would there

    def __init__(self, kernels: EmulatedKernels, seed: int = 0):
        self.kernels = kernels
        self.seed = seed  # of the order threads run in between barriers
        self.workers = WORKERS
        self.calls: list[tuple[str, tuple[int, int, int]]] = []

    def attention(self, dtype, head_dim, grid, shared_bytes, params) -> None:
        self.calls.append(("attention", tuple(grid)))
        assert shared_bytes == _cuda.smem_bytes(head_dim)
        rows = params.num_tokens * params.num_heads
        element = {"f32": 4, "f16": 2, "bf16": 2}[dtype]
        ctypes.memset(params.out, 0xFF, rows * head_dim * element)
        if params.num_splits > 1:
            ctypes.memset(params.part_out, 0xFF, params.num_splits * rows * head_dim * 4)
            ctypes.memset(params.part_max, 0xFF, params.num_splits * rows * 4)
            ctypes.memset(params.part_sum, 0xFF, params.num_splits * rows * 4)
        fn = self.kernels.function(f"tree_attention_{dtype}_d{head_dim}")
        rc = self.kernels.lib.emu_launch_attention(
            fn, *grid, _cuda.THREADS_PER_CTA, shared_bytes, ctypes.byref(params), self.seed,
            self.workers)
        self.kernels.check(rc, f"tree_attention_{dtype}_d{head_dim} grid {grid}")

    def combine(self, dtype, head_dim, grid, args) -> None:
        self.calls.append(("combine", tuple(grid)))
        assert grid[1:] == (1, 1)
        fn = self.kernels.function(f"tree_attention_combine_{dtype}")
        rc = self.kernels.lib.emu_launch_combine(
            fn, grid[0], _cuda.COMBINE_THREADS, *[a.value for a in args], self.seed,
            self.workers)
        self.kernels.check(rc, f"tree_attention_combine_{dtype} grid {grid}")


@pytest.fixture(scope="module")
def emulated(tmp_path_factory) -> EmulatedKernels:
    """tree_attention.cu built for the CPU once per module (every dtype x head_dim), with the
    emulator's self-test kernels."""
    if not sys.platform.startswith("linux"):
        pytest.skip(f"the CPU emulation of the CUDA kernel is Linux-only (this is {sys.platform})")
    gxx, found = _find_gxx()
    if gxx is None:
        pytest.skip(f"the CPU emulation of the CUDA kernel needs g++ >= {MIN_GCC} (found: {found})")
    out = tmp_path_factory.mktemp("cuda_emu") / "libtree_attention_emu.so"
    cmd = [gxx, "-std=c++20", "-O2", "-fPIC", "-shared", "-pthread", "-fno-extern-tls-init",
           "-Wno-unknown-pragmas", f"-I{EMU_DIR}", f"-I{_cuda.SOURCE_PATH.parent}",
           str(EMU_DIR / "tree_attention_emu.cpp"), "-x", "c++", str(EMU_DIR / "selftest.cu"),
           "-o", str(out)]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, f"{' '.join(cmd)}\n{build.stderr}"
    return EmulatedKernels(out)


def run_both(kernels: EmulatedKernels, batch, num_splits=None, seed=0):
    """(emulated kernel output as fp32, fp32 reference, the launches made)."""
    scale = batch.q.shape[-1] ** -0.5
    expected = tree_attention_reference(batch.q.float(), batch.k_cache.float(),
                                        batch.v_cache.float(), batch.meta, scale)
    _cuda.check_inputs(batch.q, batch.k_cache, batch.v_cache)
    launcher = EmulatedLauncher(kernels, seed)
    out = _cuda.run_tree_attention(batch.q, batch.k_cache, batch.v_cache, batch.meta, scale,
                                   launcher, num_splits)
    assert out.dtype == batch.q.dtype and out.shape == batch.q.shape
    return out.float(), expected, launcher.calls


# Each dtype meets both head dims, both GQA groups, the single-pass path (num_splits=1: the CTA
# normalises and rounds its own output) and the split-K path plan_launch picks for an H100.
CASES = [
    # dtype, head_dim, group, num_splits, seed
    (torch.float32, 64, 1, None, 0),
    (torch.float32, 128, 4, 1, 1),
    (torch.float16, 64, 4, None, 1),
    (torch.float16, 128, 1, 1, 0),
    (torch.bfloat16, 64, 1, 1, 1),
    (torch.bfloat16, 128, 4, None, 0),
]


@pytest.mark.parametrize("dtype,head_dim,group,num_splits,seed", CASES, ids=[
    f"{_cuda.DTYPE_NAMES[d]}-d{hd}-gqa{g}-{'auto' if n is None else n}split"
    for d, hd, g, n, _ in CASES])
def test_emulated_kernel_matches_reference_on_random_trees(emulated, dtype, head_dim, group,
                                                           num_splits, seed):
    """test_cuda_kernel.py's batches: 4 sequences with cached prefixes of up to 300 positions
    (crossing KV-block and key-tile boundaries), causal runs, trees of 128 nodes (both mask
    words), none, and random sizes, in a shuffled paged cache; 2 KV heads."""
    gen = torch.Generator().manual_seed(seed)
    num_seqs = 4
    batch = make_batch(
        seed=seed,
        prefix_lens=torch.randint(0, 300, (num_seqs,), generator=gen).tolist(),
        tree_sizes=[128, 0] + torch.randint(1, 64, (num_seqs - 2,), generator=gen).tolist(),
        num_causal=torch.randint(0, 4, (num_seqs,), generator=gen).tolist(),
        block_size=16, num_heads=2 * group, num_kv_heads=2, head_dim=head_dim, dtype=dtype)
    out, expected, calls = run_both(emulated, batch, num_splits=num_splits, seed=seed)
    splits = calls[0][1][2]
    assert [name for name, _ in calls] == ["attention"] + ["combine"] * (splits > 1)
    if num_splits == 1:
        assert splits == 1
    else:  # these batches are long enough for plan_launch to split them on an H100
        assert splits > 1
    torch.testing.assert_close(out, expected, **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_emulated_split_k_and_combine(emulated, dtype):
    """A long prefix forced into 3 splits (plus a short sequence whose later splits are empty)."""
    batch = make_batch(seed=5, prefix_lens=[700, 17], tree_sizes=[16, 40], num_causal=[0, 1],
                       block_size=16, num_heads=8, num_kv_heads=2, head_dim=128, dtype=dtype)
    out, expected, calls = run_both(emulated, batch, num_splits=3, seed=3)
    rows = batch.q.shape[0] * batch.q.shape[1]
    assert [name for name, _ in calls] == ["attention", "combine"]
    assert calls[0][1][2] == 3 and calls[1][1] == (rows, 1, 1)
    torch.testing.assert_close(out, expected, **TOLERANCES[dtype])


def test_emulated_odd_block_size_and_partial_tree(emulated):
    """Block size 7 (not a power of two), only the deepest tree level queried, 3 splits."""
    batch = make_batch(seed=6, prefix_lens=[45, 3], tree_sizes=[30, 9], num_causal=[2, 0],
                       block_size=7, num_heads=4, num_kv_heads=1, head_dim=64,
                       query_subset=True)
    out, expected, calls = run_both(emulated, batch, num_splits=3, seed=6)
    assert calls[0][1][2] == 3 and [name for name, _ in calls] == ["attention", "combine"]
    torch.testing.assert_close(out, expected, **TOLERANCES[torch.float32])


def test_parameter_block_matches_the_kernel(emulated):
    """The ctypes mirror in kernels/cuda_launch.py has the kernel struct's size, alignment and offsets
    (as the host compiler lays it out; NVRTC's size is checked in test_cuda_compile.py)."""
    fields = [name for name, _ in _cuda.TreeAttentionParams._fields_]
    buf = (ctypes.c_longlong * (len(fields) + 2))()
    assert emulated.lib.emu_params_layout(buf, len(buf)) == len(fields) + 2
    assert buf[0] == ctypes.sizeof(_cuda.TreeAttentionParams)
    assert buf[1] == ctypes.alignment(_cuda.TreeAttentionParams)
    offsets = {name: getattr(_cuda.TreeAttentionParams, name).offset for name in fields}
    assert dict(zip(fields, buf[2:])) == offsets


def _convert(emulated, name: str, values: np.ndarray, out_dtype) -> np.ndarray:
    values = np.ascontiguousarray(values)
    out = np.empty(values.shape, dtype=out_dtype)
    getattr(emulated.lib, name)(values.ctypes.data, out.ctypes.data, values.size)
    return out


def test_kernel_fp16_bf16_conversions_are_exact(emulated):
    """The kernel's bit-level conversions: every 16-bit pattern to float, and floats (random bit
    patterns, exact halfway points, subnormals, overflow, inf, nan) to fp16 / bf16, bit for bit
    as torch converts them (round to nearest even)."""
    halves = np.arange(1 << 16, dtype=np.uint16)
    as_f16 = halves.view(np.float16).astype(np.float32)
    as_bf16 = torch.from_numpy(halves.view(np.int16)).view(torch.bfloat16).float().numpy()
    for name, expected in (("emu_f16_to_float", as_f16), ("emu_bf16_to_float", as_bf16)):
        got = _convert(emulated, name, halves, np.float32)
        same = (got.view(np.uint32) == expected.view(np.uint32)) | (
            np.isnan(got) & np.isnan(expected))
        assert same.all(), f"{name}: {halves[~same][:8]}"

    rng = np.random.default_rng(0)
    finite16 = np.unique(as_f16[np.isfinite(as_f16)].astype(np.float64))
    finite_bf = np.unique(as_bf16[np.isfinite(as_bf16)].astype(np.float64))
    floats = np.concatenate([
        rng.integers(0, 1 << 32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32),
        ((finite16[1:] + finite16[:-1]) / 2).astype(np.float32),  # exact fp16 halfway points
        ((finite_bf[1:] + finite_bf[:-1]) / 2).astype(np.float32),  # exact bf16 halfway points
        rng.normal(0, 3, 50_000).astype(np.float32),
        rng.normal(0, 1e-5, 50_000).astype(np.float32),  # fp16 subnormals
        np.array([0.0, -0.0, 65504, 65519.99, 65520, 65536, 1e30, 5.96e-8, 2.98e-8, 6.1e-5,
                  np.inf, -np.inf, np.nan, -np.nan], dtype=np.float32),
    ])
    nan = np.isnan(floats)
    with np.errstate(over="ignore"):
        want16 = floats.astype(np.float16).view(np.uint16)
    want_bf = torch.from_numpy(floats).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    for name, want, to_float in (("emu_float_to_f16", want16, np.float16),
                                 ("emu_float_to_bf16", want_bf, None)):
        got = _convert(emulated, name, floats, np.uint16)
        bad = (got != want) & ~nan
        assert not bad.any(), f"{name}: {floats[bad][:8]} -> {got[bad][:8]}, want {want[bad][:8]}"
        back = (got[nan].view(np.float16).astype(np.float32) if to_float else
                torch.from_numpy(got[nan].view(np.int16)).view(torch.bfloat16).float().numpy())
        assert np.isnan(back).all(), f"{name}: nan not kept"


# ------------------------------------------------------------------ the emulator itself


def _selftest(emulated, name: str, blocks: int, threads: int, per_thread: int = 1, arg: int = 0,
              seed: int = 1) -> tuple[int, np.ndarray]:
    out = np.full(blocks * threads * per_thread, -7, dtype=np.int32)
    rc = emulated.lib.emu_selftest(name.encode(), blocks, threads, out.ctypes.data, arg, seed)
    return rc, out


def test_emulator_warp_primitives(emulated):
    rc, out = _selftest(emulated, "warp_ops", 3, 96, per_thread=6)
    assert rc == 0, emulated.lib.emu_last_error().decode()
    tid = np.tile(np.arange(96), 3)
    lane = tid % 32
    expected = np.stack([
        tid ^ 16, tid - lane + 5, np.where(lane >= 3, tid - 3, tid),
        np.where(lane + 7 < 32, tid + 7, tid), np.full_like(tid, np.int32(-0x55555556)),
        np.full_like(tid, 3)], axis=1).ravel()
    np.testing.assert_array_equal(out, expected)


def test_emulator_exposes_a_missing_barrier(emulated):
    blocks, threads = 4, 128
    expected = (1000 * np.arange(blocks)[:, None] + (np.arange(threads) + 1) % threads).ravel()
    rc, synced = _selftest(emulated, "neighbour", blocks, threads, arg=1)
    assert rc == 0 and (synced == expected).all()
    rc, racy = _selftest(emulated, "neighbour", blocks, threads, arg=0)
    assert rc == 0 and (racy != expected).any()  # unwritten shared memory reads the poison
    assert (racy[racy != expected] == -1).all()


def test_emulator_reports_a_deadlock(emulated):
    rc, _ = _selftest(emulated, "divergent_barrier", 2, 64)
    assert rc != 0
    assert "deadlock" in emulated.lib.emu_last_error().decode()
