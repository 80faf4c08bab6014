"""The CUDA tree-attention kernel: NVRTC compilation, per-device module cache, launch planning.

`kernels/csrc/tree_attention.cu` is compiled at run time with NVRTC (through cuda-python) for the
current device's architecture, one (dtype, head_dim) configuration at a time, on first use, and
launched on torch's current stream with the tensors' `data_ptr()`s. Importing this module never
compiles anything and never needs cuda-python, a toolkit or a GPU; using it without them raises
`CudaUnavailable`.

The host side is split so that most of it runs anywhere: `plan_launch` and `query_tiles` are
pure, and `run_tree_attention` drives any `KernelLauncher` (the CUDA driver one here).
"""

from __future__ import annotations

import ctypes
import functools
import pathlib
import re
import threading
from dataclasses import dataclass
from typing import Protocol

import torch

from kernels.attention_metadata import AttentionMetadata

SOURCE_PATH = pathlib.Path(__file__).parent / "csrc" / "tree_attention.cu"

# Must match the constants at the top of the .cu file.
KEYS_PER_TILE = 32
ROWS_PER_CTA = 16
THREADS_PER_CTA = 128
COMBINE_THREADS = 64
MIN_SPLIT_KEYS = 256  # below this a split costs more in combining than it buys in parallelism
MAX_SPLITS = 64

DTYPE_NAMES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
HEAD_DIMS = tuple(range(32, 257, 32))
LOG2_E = 1.4426950408889634


class CudaUnavailable(RuntimeError):
    """The CUDA kernel cannot run here (no cuda-python/NVRTC/GPU); use the PyTorch reference."""


class KernelCompileError(CudaUnavailable):
    """NVRTC rejected the source (or the architecture); `log` holds its output."""

    def __init__(self, message: str, log: str = ""):
        super().__init__(f"{message}\n{log}".rstrip())
        self.log = log


class UnsupportedInput(CudaUnavailable):
    """The kernel does not cover these tensors (dtype, head_dim, layout); use the reference."""


# ------------------------------------------------------------------------------- cuda-python


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


# ------------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class LaunchPlan:
    heads_per_cta: int  # RH: query heads of one KV head handled together (GQA)
    queries_per_cta: int  # QT: consecutive queries of one sequence per CTA
    head_chunks: int  # CTAs along one KV head's query heads (1 unless H / Hkv > 16)
    num_tiles: int  # query-tile slots: ceil(T / QT) + B bounds the real tile count
    num_splits: int  # split-K factor over the KV range
    split_size: int  # KV positions per split, a multiple of KEYS_PER_TILE
    smem_bytes: int  # dynamic shared memory per CTA

    def grid(self, num_kv_heads: int) -> tuple[int, int, int]:
        return (self.num_tiles, num_kv_heads * self.head_chunks, self.num_splits)


def plan_launch(num_tokens: int, num_seqs: int, num_heads: int, num_kv_heads: int,
                head_dim: int, max_seq_len: int, num_sms: int,
                num_splits: int | None = None) -> LaunchPlan:
    """Tile the batch into CTAs and choose the split-K factor (about two waves of CTAs)."""
    group = num_heads // num_kv_heads
    heads_per_cta = min(group, ROWS_PER_CTA)
    queries_per_cta = ROWS_PER_CTA // heads_per_cta
    head_chunks = -(-group // heads_per_cta)
    num_tiles = -(-num_tokens // queries_per_cta) + num_seqs
    max_seq_len = max(max_seq_len, 1)
    if num_splits is None:
        ctas = num_tiles * num_kv_heads * head_chunks
        wanted = -(-2 * num_sms // ctas)
        num_splits = min(wanted, -(-max_seq_len // MIN_SPLIT_KEYS), MAX_SPLITS)
    num_splits = max(1, num_splits)
    split_size = -(-max_seq_len // num_splits)
    split_size = -(-split_size // KEYS_PER_TILE) * KEYS_PER_TILE
    return LaunchPlan(
        heads_per_cta=heads_per_cta,
        queries_per_cta=queries_per_cta,
        head_chunks=head_chunks,
        num_tiles=num_tiles,
        num_splits=-(-max_seq_len // split_size),
        split_size=split_size,
        smem_bytes=smem_bytes(head_dim),
    )


def smem_bytes(head_dim: int) -> int:
    """Dynamic shared memory of one CTA: q [ROWS][D], K [KEYS][D + 4], V [KEYS][D] as fp32."""
    return 4 * (ROWS_PER_CTA * head_dim + KEYS_PER_TILE * (2 * head_dim + 4))


def query_tiles(cu_q_lens: torch.Tensor, num_tiles: int,
                queries_per_cta: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut every sequence's queries into tiles of `queries_per_cta` (on cu_q_lens's device, no
    host sync): tile_seq [num_tiles] int32 (-1 = unused slot), tile_start [num_tiles] int32."""
    cu = cu_q_lens.long()  # [B + 1]
    tiles = (cu[1:] - cu[:-1] + queries_per_cta - 1) // queries_per_cta  # [B]
    ends = torch.cumsum(tiles, 0)  # [B]
    index = torch.arange(num_tiles, device=cu.device)  # [N]
    seq = torch.searchsorted(ends, index, right=True)  # [N], sequence owning each tile slot
    used = seq < tiles.shape[0]
    seq_c = seq.clamp(max=tiles.shape[0] - 1)
    start = cu[seq_c] + (index - (ends - tiles)[seq_c]) * queries_per_cta  # [N]
    tile_seq = torch.where(used, seq, torch.full_like(seq, -1)).to(torch.int32)
    return tile_seq, torch.where(used, start, torch.zeros_like(start)).to(torch.int32)


# ------------------------------------------------------------------------------- launching


class TreeAttentionParams(ctypes.Structure):
    """Mirror of `struct TreeAttentionParams` in the .cu (passed by value)."""

    _fields_ = [(name, ctypes.c_void_p) for name in (
        "q", "k_cache", "v_cache", "out", "part_out", "part_max", "part_sum", "block_tables",
        "seq_lens", "cu_q_lens", "q_prefix_lens", "tree_starts", "tree_masks", "tile_seq",
        "tile_start")] + [(name, ctypes.c_longlong) for name in (
        "q_stride_t", "q_stride_h", "kv_stride_block", "kv_stride_token", "kv_stride_head")] + [
        (name, ctypes.c_int) for name in (
            "max_blocks", "num_tokens", "num_heads", "num_kv_heads", "heads_per_cta",
            "queries_per_cta", "block_size", "split_size", "num_splits")] + [
        ("scale_log2", ctypes.c_float)]


class KernelLauncher(Protocol):
    num_sms: int

    def attention(self, dtype: str, head_dim: int, grid: tuple[int, int, int], shared_bytes: int,
                  params: TreeAttentionParams) -> None: ...

    def combine(self, dtype: str, head_dim: int, grid: tuple[int, int, int],
                args: list) -> None: ...


@dataclass
class _MetaTensors:
    """The metadata as the kernel reads it: on q's device, contiguous, int32 / int64."""

    block_tables: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor  # [B] int32
    cu_q_lens: torch.Tensor  # [B + 1] int32
    q_prefix_lens: torch.Tensor  # [T] int32
    tree_starts: torch.Tensor  # [B] int32
    tree_masks: torch.Tensor  # [T, 2] int64
    tiles: dict  # queries_per_cta -> (tile_seq, tile_start)


def _meta_tensors(meta: AttentionMetadata, device: torch.device) -> _MetaTensors:
    """Cached on `meta`, so the layers of one forward share the copies and the tile maps."""
    key = ("cuda_meta", str(device))
    cached = meta._dense.get(key)
    if cached is None:
        def prep(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
            return t.to(device=device, dtype=dtype).contiguous()

        cached = _MetaTensors(
            block_tables=prep(meta.block_tables, torch.int32),
            seq_lens=prep(meta.seq_lens, torch.int32),
            cu_q_lens=prep(meta.cu_q_lens, torch.int32),
            q_prefix_lens=prep(meta.q_prefix_lens, torch.int32),
            tree_starts=prep(meta.tree_starts, torch.int32),
            tree_masks=prep(meta.tree_masks, torch.int64),
            tiles={},
        )
        meta._dense[key] = cached
    return cached


def check_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """Raise UnsupportedInput unless the kernel covers these tensors."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    dtype = DTYPE_NAMES.get(q.dtype)
    problems = []
    if dtype is None or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        problems.append(f"dtypes q={q.dtype} k={k_cache.dtype} v={v_cache.dtype}")
    if head_dim not in HEAD_DIMS or k_cache.shape[3] != head_dim:
        problems.append(f"head_dim {head_dim} (supported: multiples of 32 up to 256)")
    if num_heads % k_cache.shape[2] != 0 or k_cache.shape != v_cache.shape:
        problems.append(f"heads q={num_heads} kv={k_cache.shape[2]}")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(3) != 1 or q.stride(2) != 1:
        problems.append("layout (head_dim must be contiguous, K and V strided alike)")
    vec = 16 // q.element_size()
    if any(t.data_ptr() % 16 for t in (k_cache, v_cache)) or any(
            s % vec for s in k_cache.stride()[:3]):
        problems.append("K/V not 16-byte aligned")
    if problems:
        raise UnsupportedInput("tree_attention CUDA kernel: unsupported " + "; ".join(problems))


def run_tree_attention(
    q: torch.Tensor,  # [T, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    meta: AttentionMetadata,
    scale: float,
    launcher: KernelLauncher,
    num_splits: int | None = None,
) -> torch.Tensor:  # [T, num_heads, head_dim]
    """Plan, fill the parameter block and launch through `launcher` (inputs already checked)."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    out = torch.empty((num_tokens, num_heads, head_dim), dtype=q.dtype, device=q.device)
    if num_tokens == 0:
        return out
    plan = plan_launch(num_tokens, meta.num_seqs, num_heads, num_kv_heads, head_dim,
                       meta.max_seq_len, launcher.num_sms, num_splits)
    m = _meta_tensors(meta, q.device)
    tiles = m.tiles.get(plan.queries_per_cta)
    if tiles is None:
        tiles = m.tiles[plan.queries_per_cta] = query_tiles(
            m.cu_q_lens, plan.num_tiles, plan.queries_per_cta)
    rows = num_tokens * num_heads
    if plan.num_splits > 1:
        part_out = torch.empty((plan.num_splits, rows, head_dim), dtype=torch.float32,
                               device=q.device)
        part_max = torch.empty((plan.num_splits, rows), dtype=torch.float32, device=q.device)
        part_sum = torch.empty_like(part_max)
        parts = (part_out.data_ptr(), part_max.data_ptr(), part_sum.data_ptr())
    else:
        parts = (None, None, None)
    params = TreeAttentionParams(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(), *parts,
        m.block_tables.data_ptr(), m.seq_lens.data_ptr(), m.cu_q_lens.data_ptr(),
        m.q_prefix_lens.data_ptr(), m.tree_starts.data_ptr(), m.tree_masks.data_ptr(),
        tiles[0].data_ptr(), tiles[1].data_ptr(),
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        m.block_tables.shape[1], num_tokens, num_heads, num_kv_heads, plan.heads_per_cta,
        plan.queries_per_cta, meta.block_size, plan.split_size, plan.num_splits,
        scale * LOG2_E,
    )
    dtype = DTYPE_NAMES[q.dtype]
    launcher.attention(dtype, head_dim, plan.grid(num_kv_heads), plan.smem_bytes, params)
    if plan.num_splits > 1:
        args = [ctypes.c_void_p(p) for p in (*parts, out.data_ptr())] + [
            ctypes.c_int(plan.num_splits), ctypes.c_int(rows), ctypes.c_int(head_dim)]
        launcher.combine(dtype, head_dim, (rows, 1, 1), args)
    return out


class DeviceKernels:
    """The compiled module(s) of one GPU: loaded on first use per (dtype, head_dim)."""

    def __init__(self, index: int):
        self.driver, _ = _bindings()
        self.index = index
        major, minor = torch.cuda.get_device_capability(index)
        self.arch = f"sm_{major}{minor}"
        self.num_sms = torch.cuda.get_device_properties(index).multi_processor_count
        d = self.driver
        _check_driver(d, d.cuInit(0), "cuInit")
        self.device = _check_driver(d, d.cuDeviceGet(index), "cuDeviceGet")
        self.context = _check_driver(d, d.cuDevicePrimaryCtxRetain(self.device), "ctx retain")
        self.max_smem = _check_driver(d, d.cuDeviceGetAttribute(
            d.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            self.device), "smem attribute")
        self._functions: dict[tuple[str, int], tuple] = {}
        self._lock = threading.Lock()

    def _make_current(self) -> None:
        d = self.driver
        current = _check_driver(d, d.cuCtxGetCurrent(), "cuCtxGetCurrent")
        if int(current) != int(self.context):
            _check_driver(d, d.cuCtxSetCurrent(self.context), "cuCtxSetCurrent")

    def _functions_for(self, dtype: str, head_dim: int) -> tuple:
        key = (dtype, head_dim)
        with self._lock:
            if key not in self._functions:
                needed = smem_bytes(head_dim)
                if needed > self.max_smem:
                    raise UnsupportedInput(f"head_dim {head_dim} needs {needed} B shared memory")
                program = compile_program(self.arch, dtype, head_dim)
                try:
                    self._functions[key] = self._load(program, dtype, head_dim, needed)
                except CudaUnavailable:
                    raise
                except RuntimeError as exc:  # e.g. a driver older than NVRTC's cubins
                    raise CudaUnavailable(f"cannot load the {self.arch} kernel: {exc}") from exc
            return self._functions[key]

    def _load(self, program: CompiledProgram, dtype: str, head_dim: int, needed: int) -> tuple:
        d = self.driver
        self._make_current()
        module = _check_driver(d, d.cuModuleLoadData(program.image), "cuModuleLoadData")
        attention = _check_driver(d, d.cuModuleGetFunction(
            module, f"tree_attention_{dtype}_d{head_dim}".encode()), "get function")
        combine = _check_driver(d, d.cuModuleGetFunction(
            module, f"tree_attention_combine_{dtype}".encode()), "get function")
        if needed > 48 * 1024:  # above the default, opt in
            _check_driver(d, d.cuFuncSetAttribute(
                attention, d.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                needed), "cuFuncSetAttribute")
        return module, attention, combine

    def _launch(self, function, grid, block: int, smem: int, args: list) -> None:
        d = self.driver
        self._make_current()
        pointers = (ctypes.c_void_p * len(args))(*[ctypes.addressof(a) for a in args])
        stream = d.CUstream(torch.cuda.current_stream(self.index).cuda_stream)
        _check_driver(d, d.cuLaunchKernel(function, *grid, block, 1, 1, smem, stream,
                                          ctypes.addressof(pointers), 0), "cuLaunchKernel")

    def attention(self, dtype, head_dim, grid, shared_bytes, params) -> None:
        _, function, _ = self._functions_for(dtype, head_dim)
        self._launch(function, grid, THREADS_PER_CTA, shared_bytes, [params])

    def combine(self, dtype, head_dim, grid, args) -> None:
        _, _, function = self._functions_for(dtype, head_dim)
        self._launch(function, grid, COMBINE_THREADS, 0, args)


@functools.lru_cache(maxsize=None)
def device_kernels(index: int) -> DeviceKernels:
    """The per-device module cache (one DeviceKernels per GPU index)."""
    if not torch.cuda.is_available():
        raise CudaUnavailable("torch sees no CUDA device")
    try:
        return DeviceKernels(index)
    except CudaUnavailable:
        raise
    except RuntimeError as exc:  # the driver API is unusable from cuda-python here
        raise CudaUnavailable(f"CUDA driver unavailable: {exc}") from exc


def tree_attention_cuda(
    q: torch.Tensor,  # [T, num_heads, head_dim], on a CUDA device
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    meta: AttentionMetadata,
    scale: float,
    num_splits: int | None = None,  # None: chosen from the batch and the GPU
) -> torch.Tensor:  # [T, num_heads, head_dim]
    """Tree attention with the CUDA kernel (same contract as `tree_attention_reference`)."""
    if q.device.type != "cuda":
        raise CudaUnavailable(f"q is on {q.device}, not a CUDA device")
    check_inputs(q, k_cache, v_cache)
    index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    with torch.cuda.device(index):
        return run_tree_attention(q, k_cache, v_cache, meta, scale, device_kernels(index),
                                  num_splits)
