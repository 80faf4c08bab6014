"""PyTorch reference of tree attention over a paged KV cache: the CPU path and the test oracle."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from specmesh.kernels.attention_metadata import MAX_TREE_NODES, AttentionMetadata, unpack_bits

LONE_MAX_QUERIES = 160  # one sequence with at most this many queries: `_lone_attention`


def dense_mask(meta: AttentionMetadata) -> torch.Tensor:
    """[T, max_seq_len] bool: which KV positions of its own sequence each query may attend to."""
    cached = meta._dense.get("mask")
    if cached is not None:
        return cached
    kv_pos = torch.arange(meta.max_seq_len, device=meta.seq_lens.device)  # [L]
    causal = kv_pos[None, :] < meta.q_prefix_lens[:, None].long()  # [T, L]
    start = meta.tree_starts.long()[meta.q_seq_idx]  # [T]
    rel = kv_pos[None, :] - start[:, None]  # [T, L], tree node index of each KV position
    in_tree = (rel >= 0) & (rel < MAX_TREE_NODES)
    bits = unpack_bits(meta.tree_masks, MAX_TREE_NODES)  # [T, 128]
    tree = torch.gather(bits, 1, rel.clamp(0, MAX_TREE_NODES - 1)) & in_tree
    mask = causal | tree
    meta._dense["mask"] = mask
    return mask


def _padded_layout(meta: AttentionMetadata) -> tuple:
    """Indices that scatter the packed batch into [B, Qmax] and gather each sequence's KV
    blocks ([B, nb] block ids, or a slice when one sequence's blocks are consecutive)."""
    cached = meta._dense.get("layout")
    if cached is not None:
        return cached
    device = meta.seq_lens.device
    cu = meta.cu_q_lens.long()
    q_lens = cu[1:] - cu[:-1]  # [B]
    q_max = int(q_lens.max())
    local = torch.arange(meta.num_tokens, device=device) - cu[meta.q_seq_idx]  # [T]
    num_blocks = -(-meta.max_seq_len // meta.block_size)
    kv_blocks = meta.block_tables.long()[:, :num_blocks]  # [B, nb]: gathered whole blocks
    mask_pad = torch.zeros(meta.num_seqs, q_max, meta.max_seq_len, dtype=torch.bool,
                           device=device)  # [B, Qmax, L]
    mask_pad[:, :, 0] = True  # padding rows attend somewhere (their output is discarded)
    mask_pad[meta.q_seq_idx, local] = dense_mask(meta)
    # a lone sequence that sees all of its KV (a decode step) needs no mask: SDPA's fast path
    full = meta.num_seqs == 1 and bool(mask_pad.all())
    if meta.num_seqs == 1 and num_blocks > 0:
        first = int(kv_blocks[0, 0])
        if torch.equal(kv_blocks[0], torch.arange(first, first + num_blocks, device=device)):
            kv_blocks = slice(first, first + num_blocks)  # consecutive blocks: a view, no copy
    layout = (local, kv_blocks, q_max, None if full else mask_pad[:, None])  # [B, 1, Qmax, L]
    meta._dense["layout"] = layout
    return layout


def tree_attention_reference(
    q: torch.Tensor,  # [T, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [T, num_heads, head_dim]
    """Attention of every packed query over its sequence's visible KV positions (see metadata)."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    local, kv_blocks, q_max, mask_pad = _padded_layout(meta)
    batch, length = meta.num_seqs, meta.max_seq_len
    # whole blocks (copies, or a view of consecutive ones), then the first L positions:
    # [B, L, Hkv, D]
    k = k_cache[kv_blocks].reshape(batch, -1, num_kv_heads, head_dim)[:, :length]
    v = v_cache[kv_blocks].reshape(batch, -1, num_kv_heads, head_dim)[:, :length]
    if batch == 1 and num_tokens <= LONE_MAX_QUERIES:  # c=1 decode, verify, draft depth
        return _lone_attention(q, k[0], v[0], mask_pad, scale)
    q_pad = q.new_zeros(batch, q_max, num_heads, head_dim)  # [B, Qmax, H, D]
    q_pad[meta.q_seq_idx, local] = q
    out = F.scaled_dot_product_attention(
        q_pad.transpose(1, 2),  # [B, H, Qmax, D]
        k.transpose(1, 2),  # [B, Hkv, L, D]
        v.transpose(1, 2),
        attn_mask=mask_pad,  # [B, 1, Qmax, L]
        scale=scale,
        enable_gqa=num_heads != num_kv_heads,
    )  # [B, H, Qmax, D]
    return out.transpose(1, 2)[meta.q_seq_idx, local]  # [T, H, D]


def _lone_attention(
    q: torch.Tensor,  # [T, H, D]
    k: torch.Tensor,  # [L, Hkv, D]
    v: torch.Tensor,  # [L, Hkv, D]
    mask_pad: torch.Tensor | None,  # [1, 1, T, L] bool, or None: every query sees all L
    scale: float,
) -> torch.Tensor:  # [T, H, D]
    """Attention of one sequence's T queries as three small ops (SDPA's CPU kernel costs
    ~50-150 us per call at these sizes). Query heads are grouped by KV head."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    qh = q.reshape(num_tokens, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
    qh = qh.reshape(num_kv_heads, group * num_tokens, head_dim)  # [Hkv, g*T, D]
    scores = torch.bmm(qh, k.permute(1, 2, 0)).mul_(scale)  # [Hkv, g*T, L]
    if mask_pad is not None:
        hidden = ~mask_pad[0, 0]  # [T, L]
        scores.view(num_kv_heads, group, num_tokens, -1).masked_fill_(hidden, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.bmm(probs, v.transpose(0, 1))  # [Hkv, g*T, D]
    return out.view(num_kv_heads, group, num_tokens, head_dim).permute(2, 0, 1, 3) \
        .reshape(num_tokens, num_heads, head_dim)
