"""One sequence's attention on CPU in one call: `csrc/attention_f32.c` (AVX-512, fp32).

Decoding at concurrency 1, verifying one sequence's tree and each draft depth attend a few
queries (1..17) of one sequence over a few hundred KV positions. PyTorch spends ~50-150 us per
layer there in SDPA (or in bmm + masked_fill + softmax + bmm), mostly per-op overhead on cold
caches; this kernel does the whole layer's attention in one call, each (query, head) alone in
position order, so a query's output also does not depend on the other queries.

Built by `kernels.cpu_build` (with -ffast-math, for a vectorised exp) and checked against
PyTorch's softmax attention before use; `available()` is False where it cannot be.
"""

from __future__ import annotations

import ctypes
import functools
import logging

import torch

from kernels import cpu_build

log = logging.getLogger(__name__)

MAX_HEAD_DIM = 256  # the kernel keeps one query's output (head_dim floats) in registers


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = cpu_build.load("attention_f32.c", ("-ffast-math",))
    if lib is None:
        return None
    fn = lib.specmesh_lone_attention
    fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 5 + [ctypes.c_float, ctypes.c_int]
    fn.restype = ctypes.c_int
    return lib if _self_check(fn) else None


def _reference(q, k, v, visible, scale) -> torch.Tensor:
    """[T, H, D] softmax attention in PyTorch (the oracle for the self-check and the tests)."""
    group = q.shape[1] // k.shape[1]
    kk = k.repeat_interleave(group, dim=1)  # [L, H, D]
    vv = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("thd,lhd->htl", q, kk) * scale  # [H, T, L]
    if visible is not None:
        scores = scores.masked_fill(~visible[None], float("-inf"))
    return torch.einsum("htl,lhd->thd", torch.softmax(scores, dim=-1), vv)


def _self_check(fn) -> bool:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, 32, generator=gen)  # [T, H, D]
    k, v = torch.randn(2, 37, 2, 32, generator=gen)  # [L, Hkv, D] each
    visible = torch.rand(3, 37, generator=gen) > 0.5
    visible[:, 0] = True
    ok = all(torch.allclose(_call(fn, q, k, v, m, 0.3), _reference(q, k, v, m, 0.3),
                            rtol=1e-4, atol=1e-5) for m in (None, visible))
    if not ok:
        log.warning("CPU attention kernel disagrees with PyTorch; not used")
    return ok


def _call(fn, q, k, v, visible, scale: float) -> torch.Tensor:
    num_tokens, num_heads, head_dim = q.shape
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    mask = None if visible is None else visible.to(torch.uint8).contiguous()  # [T, L]
    out = torch.empty_like(q)  # [T, H, D]
    work = num_tokens * num_heads * k.shape[0]
    threads = 1 if work < 1 << 15 else torch.get_num_threads()  # small: no team wake-up
    rc = fn(q.data_ptr(), k.data_ptr(), v.data_ptr(), 0 if mask is None else mask.data_ptr(),
            out.data_ptr(), num_tokens, num_heads, k.shape[1], head_dim, k.shape[0], scale,
            threads)
    if rc != 0:
        raise MemoryError("attention scratch allocation failed")
    return out


def fits(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether the kernel can take these shapes (fp32 CPU, head_dim % 16 == 0, <= 256)."""
    d = q.shape[-1]
    return (q.dtype == k.dtype == torch.float32 and q.device.type == "cpu"
            and d % 16 == 0 and d <= MAX_HEAD_DIM and q.shape[1] % k.shape[1] == 0
            and _library() is not None)


def lone_attention(
    q: torch.Tensor,  # [T, H, D]
    k: torch.Tensor,  # [L, Hkv, D]
    v: torch.Tensor,  # [L, Hkv, D]
    visible: torch.Tensor | None,  # [T, L] bool, or None: every query sees every position
    scale: float,
) -> torch.Tensor:  # [T, H, D]
    lib = _library()
    if lib is None:
        raise RuntimeError("CPU attention kernel unavailable (see kernels.cpu_attention.fits)")
    return _call(lib.specmesh_lone_attention, q, k, v, visible, scale)
