"""One huge-page arena for the fp16-resident weights.

Decoding on CPU streams every projection weight once per step, so the time per step is bound by
how fast memory reaches the cores. Scattered 4 KiB pages make that stream pay a TLB miss every
4 KiB, which costs most under virtualisation (a two-level page walk); hardware prefetchers also
stop at page edges. `pack(tensors)` copies the tensors, in the order given (the order the
forward reads them), into one 2 MiB-aligned buffer advised as transparent huge pages
(`madvise(MADV_HUGEPAGE)`, honoured when THP is `madvise` or `always`) and returns views into
it. `SPECMESH_WEIGHT_ARENA=0` keeps the separate tensors (A/B).

`streamed(nbytes)`: whether a model with this many bytes of such weights should stream them
non-temporally (`kernels/csrc/linear_f16.c`, PREFETCHNTA): when they are far bigger than the
last-level cache, nothing of them survives one forward anyway, and caching them only evicts
what the other processes of the box keep warm. Measured here (one process, target 1 + 4 rows
then 5 draft forwards, six alternations): the draft's five forwards 5.0-6.1 -> 4.4-5.0 ms, the
target step unchanged. `SPECMESH_STREAM_MB` overrides the threshold (0 = always, a huge
number = never).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import pathlib
import sys

import torch

HUGE = 2 << 20  # bytes in one transparent huge page on x86-64 / arm64 (4K base pages)
MADV_HUGEPAGE = 14
ALIGN = 64  # bytes: each tensor starts on a cache line


STREAM_FALLBACK_MB = 64.0  # where the cache size cannot be read


def llc_bytes() -> int | None:
    """Size of CPU 0's last-level cache (Linux sysfs), or None."""
    base = pathlib.Path("/sys/devices/system/cpu/cpu0/cache")
    sizes = []
    for index in base.glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * unit)
    return max(sizes) if sizes else None


def streamed(nbytes: int) -> bool:
    """True if weights of `nbytes` should be prefetched non-temporally: more than
    $SPECMESH_STREAM_MB, by default twice the last-level cache (64 MB where unknown)."""
    env = os.environ.get("SPECMESH_STREAM_MB", "").strip()
    if env:  # set and not empty
        try:
            limit_mb = float(env)
        except ValueError:
            raise ValueError(f"SPECMESH_STREAM_MB: {env!r} is not a number of MB") from None
        return nbytes > limit_mb * (1 << 20)
    llc = llc_bytes()
    return nbytes > (2 * llc if llc else STREAM_FALLBACK_MB * (1 << 20))


def enabled() -> bool:
    return os.environ.get("SPECMESH_WEIGHT_ARENA", "1") != "0" and sys.platform == "linux"


def _advise_huge(addr: int, nbytes: int) -> bool:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return libc.madvise(ctypes.c_void_p(addr), ctypes.c_size_t(nbytes), MADV_HUGEPAGE) == 0


def _offsets(tensors: list[torch.Tensor]) -> tuple[list[int], int]:
    """Byte offset of each tensor in the arena (cache-line aligned) and the total size."""
    offsets, at = [], 0
    for t in tensors:
        offsets.append(at)
        at += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
    return offsets, at


def pack(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Contiguous copies of `tensors` (same dtype, all on CPU) laid out back to back in one
    huge-page-advised buffer; the inputs are not modified."""
    if not tensors:
        return []
    dtype = tensors[0].dtype
    assert all(t.dtype == dtype and t.device.type == "cpu" for t in tensors)
    offsets, total = _offsets(tensors)
    raw = torch.empty(total + HUGE, dtype=torch.uint8)  # untouched pages: advise before writing
    start = -raw.data_ptr() % HUGE
    _advise_huge(raw.data_ptr() + start, total - total % HUGE + HUGE)
    arena = raw[start:start + total]
    out = []
    for t, off in zip(tensors, offsets):
        nbytes = t.numel() * t.element_size()
        view = arena[off:off + nbytes].view(dtype).view(t.shape)
        view.copy_(t)
        out.append(view)
    return out
