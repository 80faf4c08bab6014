"""tree_attention: dispatch to the CUDA kernel for CUDA tensors, to our CPU kernel for fp32 CPU
tensors, and to the PyTorch reference where neither runs."""

from __future__ import annotations

import functools
import warnings

import torch

from specmesh.kernels import cpu_attention
from specmesh.kernels._cuda import CudaUnavailable, tree_attention_cuda
from specmesh.kernels.attention_metadata import AttentionMetadata
from specmesh.kernels.reference import tree_attention_reference


@functools.lru_cache(maxsize=None)
def _warn_once(reason: str) -> None:
    warnings.warn(f"{reason}; using the PyTorch reference instead", RuntimeWarning, stacklevel=4)


def tree_attention(
    q: torch.Tensor,  # [T, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [T, num_heads, head_dim]
    """Every query attends to its committed prefix, the causal new tokens before it, and its
    tree ancestors (and itself), as described in `kernels.attention_metadata`.

    CUDA tensors run the kernel in `kernels/csrc/tree_attention.cu`; where it cannot run (no
    cuda-python / NVRTC, an unsupported dtype or head_dim) the reference runs, with one warning
    per reason. fp32 CPU tensors run `kernels/csrc/attention_f32.c` where it builds (AVX-512, a
    C compiler), the reference otherwise."""
    if q.is_cuda:
        try:
            return tree_attention_cuda(q, k_cache, v_cache, meta, scale)
        except CudaUnavailable as exc:
            _warn_once(str(exc))
    elif cpu_attention.fits(q, k_cache):
        return cpu_attention.tree_attention_cpu(q, k_cache, v_cache, meta, scale)
    return tree_attention_reference(q, k_cache, v_cache, meta, scale)
