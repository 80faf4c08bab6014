"""Copy a sequence's KV between the paged cache and plain numpy arrays (for the prefix cache).

The array layout is `[num_layers, 2, num_positions, num_kv_heads, head_dim]` (index 0 = K,
1 = V), in the pool's dtype. numpy has no bfloat16, so a bfloat16 pool exports its bit pattern as
uint16 and imports uint16 back bit for bit (the model fingerprint already names the dtype).
"""

from __future__ import annotations

import numpy as np
import torch

from specmesh.kernels.kv_cache import PagedKVCache

_NUMPY_VIEW = {torch.bfloat16: (torch.int16, np.uint16)}  # torch dtype -> (same-width view)


def numpy_dtype(kv: PagedKVCache) -> np.dtype:
    """The numpy dtype export_chunks returns and import_chunks takes for this cache."""
    if kv.k.dtype in _NUMPY_VIEW:
        return np.dtype(_NUMPY_VIEW[kv.k.dtype][1])
    return np.dtype(torch.empty(0, dtype=kv.k.dtype).numpy().dtype)


def export_chunks(kv: PagedKVCache, seq_id: str, start: int, end: int) -> np.ndarray:
    """KV of positions [start, end) of `seq_id` -> [num_layers, 2, end - start, Hkv, D]."""
    if not 0 <= start <= end <= kv.num_tokens(seq_id):
        raise ValueError(f"positions [{start}, {end}) outside the {kv.num_tokens(seq_id)} valid "
                         f"positions of {seq_id!r}")
    slots = kv.slots(seq_id, torch.arange(start, end)).to(kv.k.device)  # [n]
    flat_k = kv.k.view(kv.k.shape[0], -1, *kv.k.shape[3:])  # [L, NB*BS, Hkv, D]
    flat_v = kv.v.view(kv.v.shape[0], -1, *kv.v.shape[3:])
    out = torch.stack([flat_k[:, slots], flat_v[:, slots]], dim=1)  # [L, 2, n, Hkv, D]
    if out.dtype in _NUMPY_VIEW:
        view_dtype, np_dtype = _NUMPY_VIEW[out.dtype]
        return out.view(view_dtype).cpu().numpy().view(np_dtype)
    return out.cpu().numpy()


def import_chunks(kv: PagedKVCache, seq_id: str, start: int, array: np.ndarray) -> None:
    """Write `array` [num_layers, 2, n, Hkv, D] to positions start.. of `seq_id`.

    The blocks must already be reserved (`kv.reserve`); nothing else changes (the caller
    declares the positions valid with `kv.set_num_tokens`).
    """
    num_layers, _, _, num_kv_heads, head_dim = kv.k.shape
    n = array.shape[2] if array.ndim == 5 else -1
    if array.shape != (num_layers, 2, n, num_kv_heads, head_dim):
        raise ValueError(f"array shape {array.shape} is not "
                         f"[{num_layers}, 2, n, {num_kv_heads}, {head_dim}]")
    if array.dtype != numpy_dtype(kv):
        raise ValueError(f"array dtype {array.dtype} is not the cache's {numpy_dtype(kv)}")
    reserved = len(kv.block_table(seq_id)) * kv.block_size
    if not 0 <= start <= start + n <= reserved:
        raise ValueError(f"positions [{start}, {start + n}) outside the {reserved} reserved "
                         f"positions of {seq_id!r}")
    if n == 0:
        return
    host = np.require(array, requirements=["C", "W"])  # torch wants writable memory
    if kv.k.dtype in _NUMPY_VIEW:
        host = host.view(np.int16)
    values = torch.from_numpy(host).view(kv.k.dtype).to(kv.k.device)  # [L, 2, n, Hkv, D]
    slots = kv.slots(seq_id, torch.arange(start, start + n)).to(kv.k.device)  # [n]
    flat_k = kv.k.view(num_layers, -1, num_kv_heads, head_dim)  # [L, NB*BS, Hkv, D]
    flat_v = kv.v.view(num_layers, -1, num_kv_heads, head_dim)
    flat_k[:, slots] = values[:, 0]
    flat_v[:, slots] = values[:, 1]
