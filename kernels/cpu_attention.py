"""Tree attention over the paged KV cache on CPU in one call per layer: `csrc/attention_f32.c`.

The CPU twin of the CUDA kernel, on the same metadata (`kernels.attention_metadata`). PyTorch's
reference gathers each sequence's KV blocks, pads the batch and runs SDPA with a dense mask:
~50-150 us per layer for one sequence, and a gather plus padding per layer for a batch. This
kernel reads KV in place through the block tables and computes each (query, head) alone over
its visible positions in position order, so a query's output does not depend on its batch mates
or on the tree around it.

Built by `kernels.cpu_build` and checked against the PyTorch reference before use; `fits()` is
False where it cannot run.
"""

from __future__ import annotations

import ctypes
import functools
import logging

import torch

from specmesh.kernels import cpu_build
from specmesh.kernels.attention_metadata import (
    MAX_TREE_NODES,
    AttentionMetadata,
    SequenceStep,
    build_metadata,
)

log = logging.getLogger(__name__)

MAX_HEAD_DIM = 256  # the kernel keeps one query's output (head_dim floats) in registers
_ARGS = ([ctypes.c_void_p] * 4 + [ctypes.c_int] + [ctypes.c_void_p] * 5
         + [ctypes.c_int] * 6 + [ctypes.c_float, ctypes.c_int])


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = cpu_build.load("attention_f32.c", ("-fno-math-errno",))
    if lib is None:
        return None
    fn = lib.specmesh_tree_attention
    fn.argtypes = _ARGS
    fn.restype = ctypes.c_int
    return lib if _self_check(fn) else None


def _self_check(fn) -> bool:
    """Two sequences (one with a 3-node tree), scattered blocks, GQA, against the reference."""
    from specmesh.kernels.reference import tree_attention_reference

    gen = torch.Generator().manual_seed(0)
    k_cache, v_cache = torch.randn(2, 9, 4, 2, 32, generator=gen)  # [blocks, bs, Hkv, D] each
    ancestors = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    meta = build_metadata([SequenceStep([3, 0, 7], 6, 2, ancestors),
                           SequenceStep([5, 1], 5, 1)], block_size=4)
    q = torch.randn(meta.num_tokens, 4, 32, generator=gen)  # [T, H, D]
    ok = torch.allclose(_call(fn, q, k_cache, v_cache, meta, 0.3),
                        tree_attention_reference(q, k_cache, v_cache, meta, 0.3),
                        rtol=1e-4, atol=1e-5)
    if not ok:
        log.warning("CPU tree-attention kernel disagrees with the reference; not used")
    return ok


_last_metadata: list = [(None, ())]  # [(metadata, its kernel tensors)]: every layer shares one


def kernel_metadata(meta: AttentionMetadata) -> tuple[torch.Tensor, ...]:
    """The metadata in the kernel's integer types, converted once per forward, not per layer
    (one (meta, tensors) pair swapped whole, so threads never see a mixed pair)."""
    last_meta, tensors = _last_metadata[0]
    if last_meta is not meta:
        tensors = (meta.block_tables.to(torch.int32).contiguous(),  # [B, max_blocks]
                   meta.q_seq_idx.to(torch.int64).contiguous(),  # [T]
                   meta.q_prefix_lens.to(torch.int32).contiguous(),  # [T]
                   meta.tree_starts.to(torch.int32).contiguous(),  # [B]
                   meta.tree_masks.to(torch.int64).contiguous())  # [T, 2]
        _last_metadata[0] = (meta, tensors)
    return tensors


def _call(fn, q, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    num_tokens, num_heads, head_dim = q.shape
    q = q.contiguous()
    tables, seq_idx, prefix, starts, masks = kernel_metadata(meta)
    out = torch.empty_like(q)  # [T, H, D]
    max_visible = meta.max_seq_len + MAX_TREE_NODES
    work = num_tokens * num_heads * meta.max_seq_len
    threads = 1 if work < 1 << 12 else min(num_tokens * num_heads, torch.get_num_threads())
    rc = fn(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(),
            tables.shape[1], seq_idx.data_ptr(), prefix.data_ptr(), starts.data_ptr(),
            masks.data_ptr(), out.data_ptr(), num_tokens, num_heads, k_cache.shape[2],
            head_dim, k_cache.shape[1], max_visible, scale, threads)
    if rc != 0:
        raise MemoryError("tree-attention scratch allocation failed")
    return out


def fits(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether the kernel takes these tensors: fp32 on CPU, contiguous cache, head_dim a
    multiple of 16 up to 256, whole query groups per KV head."""
    d = q.shape[-1]
    return (q.dtype == k_cache.dtype == torch.float32 and q.device.type == "cpu"
            and k_cache.is_contiguous() and d % 16 == 0 and d <= MAX_HEAD_DIM
            and q.shape[1] % k_cache.shape[2] == 0 and _library() is not None)


def tree_attention_cpu(
    q: torch.Tensor,  # [T, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [T, num_heads, head_dim]
    lib = _library()
    if lib is None:
        raise RuntimeError("CPU tree-attention kernel unavailable (see kernels.cpu_attention)")
    return _call(lib.specmesh_tree_attention, q, k_cache, v_cache, meta, scale)
