"""fp16-resident weights for few-row CPU projections: `csrc/linear_f16.c`, built on first use.

Checkpoints stored in fp16 (the stand-ins, most real ones) are served in fp32 on CPU. Every fp16
value converts to fp32 exactly, so keeping the weight in fp16 and converting while multiplying
gives the fp32 product of the very same weights, at half the bytes streamed per decode step.
PyTorch has no CPU op for fp16 weights x fp32 activations, so this is our own small kernel
(AVX-512 F16C + FMA, OpenMP over output panels). Its summation order is fixed per output, so a
row's result does not depend on the other rows (batch-invariant by construction).

The kernel reads weights laid out in panels of 64 outputs (`pack_panels`: [N, K] ->
[ceil(N / 64), K, 64]), so one sweep streams the weight front to back; layers keep them so
(`kernels.linear.attach_f16` / `attach_q8`).

Built by `kernels.cpu_build` and checked against `F.linear` before use. Where it cannot be
(no compiler, no AVX-512, `SPECMESH_CPU_KERNELS=0`), `available()` is False and the layers stay
fp32 (`kernels.linear`).
"""

from __future__ import annotations

import ctypes
import functools
import logging

import torch
import torch.nn.functional as F

from specmesh.kernels import cpu_build
from specmesh.kernels.quantize import dequantize_rows

log = logging.getLogger(__name__)

PANEL = 64  # outputs per panel (csrc/linear_f16.c)


def num_panels(out_features: int) -> int:
    return -(-out_features // PANEL)


def pack_panels(w: torch.Tensor) -> torch.Tensor:
    """w [N, K] -> [ceil(N / 64), K, 64]: panel p holds outputs 64p..64p+63 for every k,
    zeros past N; the layout `linear_f16` / `linear_q8` read."""
    n, k = w.shape
    padded = torch.zeros(num_panels(n) * PANEL, k, dtype=w.dtype)  # [N_pad, K]
    padded[:n] = w
    return padded.view(-1, PANEL, k).transpose(1, 2).contiguous()  # [P, K, 64]


def unpack_panels(panels: torch.Tensor, out_features: int) -> torch.Tensor:
    """`pack_panels`' inverse: [P, K, 64] -> [out_features, K]."""
    return panels.transpose(1, 2).reshape(-1, panels.shape[1])[:out_features]


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = cpu_build.load("linear_f16.c")
    if lib is None:
        return None
    fn = lib.specmesh_linear_f16
    fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 5
    fn.restype = None
    q8 = lib.specmesh_linear_q8
    q8.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 5
    q8.restype = None
    return lib if _self_check(fn) and _self_check_q8(q8) else None


def _self_check(fn) -> bool:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(37, 48, generator=gen).half()  # [N, K]: a panel tail
    x = torch.randn(13, 48, generator=gen)  # [M, K]: a pass tail
    got = _call(fn, x, pack_panels(w), 37)
    want = F.linear(x, w.float())
    ok = bool(torch.allclose(got, want, rtol=1e-5, atol=1e-5)) and \
        torch.equal(_call(fn, x[5:6], pack_panels(w), 37), got[5:6])
    if not ok:
        log.warning("fp16 CPU kernel disagrees with F.linear; not used")
    return ok


def _self_check_q8(fn) -> bool:
    gen = torch.Generator().manual_seed(1)
    q = torch.randint(-127, 128, (37, 48), generator=gen, dtype=torch.int8)  # [N, K]
    scale = torch.rand(37, generator=gen) / 64  # [N]
    x = torch.randn(13, 48, generator=gen)  # [M, K]
    got = _call_q8(fn, x, pack_panels(q), scale)
    want = F.linear(x, dequantize_rows(q, scale))
    ok = bool(torch.allclose(got, want, rtol=1e-5, atol=1e-5)) and \
        torch.equal(_call_q8(fn, x[5:6], pack_panels(q), scale), got[5:6])
    if not ok:
        log.warning("int8 CPU kernel disagrees with F.linear; not used")
    return ok


def _check_panels(x: torch.Tensor, panels: torch.Tensor, out_features: int) -> None:
    if (panels.dim() != 3 or panels.shape[2] != PANEL or not panels.is_contiguous()
            or panels.shape[1] != x.shape[1] or panels.shape[0] != num_panels(out_features)):
        raise ValueError(f"panels: {tuple(panels.shape)} is not pack_panels of an "
                         f"[{out_features}, {x.shape[1]}] weight")


def _call_q8(fn, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
             stream: bool = False) -> torch.Tensor:
    x = x.contiguous()
    rows, k = x.shape
    n = scale.shape[0]
    _check_panels(x, q, n)
    y = torch.empty(rows, n, dtype=torch.float32)  # [M, N]
    if rows:
        fn(q.data_ptr(), scale.data_ptr(), x.data_ptr(), y.data_ptr(), rows, n, k,
           torch.get_num_threads(), int(stream))
    return y


def _call(fn, x: torch.Tensor, w16: torch.Tensor, n: int, stream: bool = False) -> torch.Tensor:
    x = x.contiguous()
    rows, k = x.shape
    _check_panels(x, w16, n)
    y = torch.empty(rows, n, dtype=torch.float32)  # [M, N]
    if rows:
        fn(w16.data_ptr(), x.data_ptr(), y.data_ptr(), rows, n, k,
           torch.get_num_threads(), int(stream))
    return y


def available() -> bool:
    return _library() is not None


def fits(weight: torch.Tensor) -> bool:
    """True if `weight` (fp32, CPU) can be served from fp16 exactly: every value is an fp16
    value (an fp16 checkpoint loaded as fp32)."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or weight.dim() != 2:
        return False
    if not weight.numel():
        return False
    with torch.no_grad():
        return bool(torch.equal(weight.half().float(), weight))


def linear_f16(x: torch.Tensor, panels: torch.Tensor, out_features: int,
               bias: torch.Tensor | None = None, stream: bool = False) -> torch.Tensor:
    """x [M, K] fp32 @ w [N, K]^T (+ bias [N]) -> [M, N] fp32, for `panels` = pack_panels(w)
    fp16 and N = `out_features`. `stream`: prefetch the weight non-temporally
    (`kernels.weight_arena.streamed`); same result either way."""
    lib = _library()
    if lib is None:
        raise RuntimeError("fp16 CPU kernel unavailable (see kernels.cpu_linear.available)")
    y = _call(lib.specmesh_linear_f16, x, panels, out_features, stream)
    return y if bias is None else y.add_(bias)


def linear_q8(x: torch.Tensor, weight_q8: torch.Tensor, scale: torch.Tensor,
              bias: torch.Tensor | None = None, stream: bool = False) -> torch.Tensor:
    """x [M, K] fp32 @ (q [N, K] int8 * scale [N])^T (+ bias [N]) -> [M, N] fp32
    (`kernels.quantize`), for `weight_q8` = pack_panels(q)."""
    lib = _library()
    if lib is None:
        raise RuntimeError("CPU projection kernels unavailable (see kernels.cpu_linear.available)")
    y = _call_q8(lib.specmesh_linear_q8, x, weight_q8, scale, stream)
    return y if bias is None else y.add_(bias)
