"""CUDA tree attention, part 3 of 3: the launch, on torch's current stream, with the tensors'
`data_ptr()`s. `run_tree_attention` drives any `KernelLauncher` (the CUDA driver one here,
an emulator in the tests).
"""

from __future__ import annotations

import ctypes
import functools
import threading
from dataclasses import dataclass
from typing import Protocol

import torch

from specmesh.kernels.attention_metadata import AttentionMetadata
from specmesh.kernels.cuda_compile import (
    DTYPE_NAMES,
    HEAD_DIMS,
    CompiledProgram,
    CudaUnavailable,
    UnsupportedInput,
    _bindings,
    _check_driver,
    compile_program,
)
from specmesh.kernels.cuda_plan import (
    COMBINE_THREADS,
    THREADS_PER_CTA,
    plan_launch,
    query_tiles,
    smem_bytes,
)

LOG2_E = 1.4426950408889634


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
