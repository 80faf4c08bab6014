"""Batch-invariant forward pieces: a row's result never depends on the other rows.

In the default mode a sequence's logits can differ in the last bits with what shares its batch:
GEMM kernels are chosen by row count, and the padded reference attention reduces over padded
lengths. With `Transformer.set_batch_invariant(True)` every projection runs one row at a time
(a GEMV per row) and every query attends to exactly its visible KV positions, in position
order, alone. Then a token's logits are bitwise the same whether it is decoded alone, with any
batch mates, or verified as a tree node (its ancestors are its causal predecessors). It costs a
weight sweep per row, so it is a mode for reproducibility, not for speed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from specmesh.kernels.attention_metadata import MAX_TREE_NODES, AttentionMetadata, unpack_bits


def project_rows(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """x [T, in] -> [T, out], one GEMV per row."""
    return torch.stack([F.linear(row, layer.weight, layer.bias) for row in x]) if len(x) \
        else F.linear(x, layer.weight, layer.bias)


def visible_positions(meta: AttentionMetadata, t: int) -> torch.Tensor:
    """[L] KV positions query t attends to, ascending: its causal prefix, then its tree
    ancestors and itself."""
    b = int(meta.q_seq_idx[t])
    prefix = torch.arange(int(meta.q_prefix_lens[t]))
    bits = unpack_bits(meta.tree_masks[t:t + 1], MAX_TREE_NODES)[0]  # [128] bool
    nodes = torch.nonzero(bits).squeeze(-1)
    return torch.cat([prefix, int(meta.tree_starts[b]) + nodes])


def attention_per_query(
    q: torch.Tensor,  # [T, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [T, num_heads, head_dim]
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    flat_k = k_cache.reshape(-1, num_kv_heads, head_dim)
    flat_v = v_cache.reshape(-1, num_kv_heads, head_dim)
    out = torch.empty_like(q)
    for t in range(num_tokens):
        pos = visible_positions(meta, t)  # [L]
        table = meta.block_tables[int(meta.q_seq_idx[t])].long()
        slots = table[pos // meta.block_size] * meta.block_size + pos % meta.block_size
        k = flat_k[slots].transpose(0, 1)[None]  # [1, Hkv, L, D]
        v = flat_v[slots].transpose(0, 1)[None]
        out[t] = F.scaled_dot_product_attention(
            q[t][None, :, None], k, v, scale=scale,
            enable_gqa=num_heads != num_kv_heads)[0, :, 0]  # [H, D]
    return out
