"""RMSNorm of fp32 rows on CPU in one call: `csrc/rms_norm_f32.c` (AVX-512).

PyTorch's CPU `rms_norm` is ~6 small ops (pow, mean, add, rsqrt, mul, mul): 25-35 us a call at
decode sizes, 40% of the draft model's op time. This computes HF's formula in one call, each
row's reduction in a fixed order (a row never depends on the other rows). Built by
`kernels.cpu_build` and checked against PyTorch before use; `fits()` is False where it cannot run.
"""

from __future__ import annotations

import ctypes
import functools
import logging

import torch

from specmesh.kernels import cpu_build

log = logging.getLogger(__name__)


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = cpu_build.load("rms_norm_f32.c")
    if lib is None:
        return None
    fn = lib.specmesh_rms_norm
    fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 2 + [ctypes.c_float]
    fn.restype = None
    return lib if _self_check(fn) else None


def reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's LlamaRMSNorm in fp32."""
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _self_check(fn) -> bool:
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 48, generator=gen), torch.randn(48, generator=gen)
    got = _call(fn, x, w, 1e-5)
    ok = torch.allclose(got, reference(x, w, 1e-5), rtol=1e-5, atol=1e-6) and \
        torch.equal(_call(fn, x[2:3], w, 1e-5), got[2:3])
    if not ok:
        log.warning("CPU rms_norm kernel disagrees with PyTorch; not used")
    return ok


def _call(fn, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.contiguous()
    y = torch.empty_like(x)  # [rows, dim]
    fn(x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.shape[0], x.shape[1], eps)
    return y


def available() -> bool:
    return _library() is not None


def fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """fp32 CPU rows [T, dim] with dim % 16 == 0 and a contiguous fp32 weight."""
    return (x.dtype == weight.dtype == torch.float32 and x.device.type == "cpu" and x.dim() == 2
            and x.shape[1] % 16 == 0 and weight.is_contiguous() and _library() is not None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, dim] fp32 -> [T, dim]; HF's RMSNorm up to rounding."""
    lib = _library()
    if lib is None:
        raise RuntimeError("CPU rms_norm kernel unavailable (see kernels.cpu_norm.fits)")
    return _call(lib.specmesh_rms_norm, x, weight, eps)
