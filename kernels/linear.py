"""Projections for few-row inputs: pick the GEMM that reads the weight once, by row count.

Weights of an fp16 checkpoint are kept in fp16 and multiplied by `kernels.cpu_linear` (fp32
accumulation, the same values as fp32 weights, half the bytes, batch-invariant, and faster than
sgemm at every row count measured: 0.31x at M=1 to 0.76x at M=512 for the 78M stand-in's
weights); their fp32 copy is freed (`attach_f16`). What follows is for fp32 weights.

Decoding runs 1 row per sequence and verification 1 + tree rows, so the projections of a
decoder are GEMMs with M = 1..17 rows against a large weight: memory-bound work whose cost
should be one sweep over the weight whatever M is. MKL's plain sgemm is not flat there (on a
2-core Xeon, the 78M stand-in's weights: 14 ms at M=1, 32 ms at M=9); MKL's packed GEMM
(`cblas_sgemm_pack` + `cblas_sgemm_compute`, what inductor's weight freezing uses) is nearly flat
(20 ms at M=9) but loses at M <= 3 and for large M. So on CPU in float32:

    M < PACKED_MIN_ROWS or M > PACKED_MAX_ROWS  -> F.linear (plain sgemm / gemv)
    otherwise                                   -> torch.ops.mkl._mkl_linear on a packed copy

The packed copy is made once per weight (`pack_linear`). MKL's packed-B layout does not depend
on M, so one copy serves every row count; `pack_linear` checks that on the weight itself
(against F.linear, every M in the packed range) and leaves the layer unpacked if it ever fails.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from specmesh.kernels import cpu_linear
from specmesh.kernels.invariant import project_rows
from specmesh.kernels.quantize import quantize_rows

log = logging.getLogger(__name__)

PACKED_MIN_ROWS = 4
PACKED_MAX_ROWS = 16
_PACK_ROWS = PACKED_MAX_ROWS  # the batch size MKL is told at pack time
_CHECK_TOL = 1e-4  # relative; summation order differs from sgemm, nothing else may


def packed_gemm_available() -> bool:
    return bool(torch.backends.mkl.is_available()) and hasattr(torch.ops.mkl,
                                                                "_mkl_reorder_linear_weight")


def pack_linear(layer: nn.Linear) -> bool:
    """Attach an MKL-packed copy of `layer.weight` (CPU, float32) as `layer.packed_weight`.
    Returns False (and attaches nothing) where packing is unavailable or fails its check."""
    w = layer.weight
    if w.device.type != "cpu" or w.dtype != torch.float32 or not packed_gemm_available():
        return False
    with torch.no_grad():
        packed = torch.ops.mkl._mkl_reorder_linear_weight(w.detach(), _PACK_ROWS)
        if not _packed_matches(w.detach(), packed):
            log.warning("MKL packed GEMM disagrees with F.linear for %s; using F.linear",
                        tuple(w.shape))
            return False
    layer.packed_weight = packed
    return True


def _packed_matches(w: torch.Tensor, packed: torch.Tensor) -> bool:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(PACKED_MAX_ROWS, w.shape[1], generator=gen)  # [Mmax, in]
    for m in range(PACKED_MIN_ROWS, PACKED_MAX_ROWS + 1):
        want = F.linear(x[:m], w)  # [m, out]
        got = torch.ops.mkl._mkl_linear(x[:m], packed, w, None, m)
        scale = float(want.abs().max()) or 1.0
        if got.shape != want.shape or float((got - want).abs().max()) > _CHECK_TOL * scale:
            return False
    return True


def attach_f16(layer: nn.Linear, free_fp32: bool = True) -> bool:
    """Serve `layer` from an fp16 copy of its weight (`layer.weight_f16`, in the kernel's
    panels: `cpu_linear.pack_panels`) where that is exact and the CPU kernel is available; `free_fp32` drops the fp32 weight (keep it when it is
    shared, e.g. tied embeddings). Returns False (and changes nothing) otherwise."""
    w = layer.weight
    if not cpu_linear.fits(w) or not cpu_linear.available():
        return False
    layer.weight_f16 = cpu_linear.pack_panels(w.detach().half())  # [ceil(out / 64), in, 64]
    if free_fp32:
        layer.weight = nn.Parameter(w.data[:0].clone(), requires_grad=False)
    return True


def attach_q8(layer: nn.Linear) -> bool:
    """Serve `layer` from int8 rows and their scales (`layer.weight_q8` in the kernel's panels,
    `layer.weight_scale`; `kernels.quantize`) where the CPU kernel is available; drops the fp32 weight. Lossy: for a
    draft model only. Returns False (and changes nothing) otherwise."""
    w = layer.weight
    if (w.device.type != "cpu" or w.dtype != torch.float32 or w.dim() != 2 or not w.numel()
            or not cpu_linear.available()):
        return False
    q, layer.weight_scale = quantize_rows(w)  # [out, in] int8, [out] fp32
    layer.weight_q8 = cpu_linear.pack_panels(q)  # [ceil(out / 64), in, 64]
    layer.weight = nn.Parameter(w.data[:0].clone(), requires_grad=False)
    return True


def project(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """x [T, in] -> [T, out], equal to `layer(x)` up to summation order (to int8 rounding for
    a layer served from `attach_q8`)."""
    weight_q8 = getattr(layer, "weight_q8", None)
    if weight_q8 is not None and x.dim() == 2 and x.dtype == torch.float32:
        return cpu_linear.linear_q8(x, weight_q8, layer.weight_scale, layer.bias,
                                    getattr(layer, "stream_weights", False))
    weight_f16 = getattr(layer, "weight_f16", None)
    if weight_f16 is not None and x.dim() == 2 and x.dtype == torch.float32:
        return cpu_linear.linear_f16(x, weight_f16, layer.out_features, layer.bias,  # invariant
                                     getattr(layer, "stream_weights", False))
    if getattr(layer, "row_wise", False):  # batch-invariant mode: one GEMV per row
        return project_rows(layer, x)
    packed = getattr(layer, "packed_weight", None)
    rows = x.shape[0]
    if packed is None or x.dim() != 2 or not PACKED_MIN_ROWS <= rows <= PACKED_MAX_ROWS:
        return F.linear(x, layer.weight, layer.bias)
    return torch.ops.mkl._mkl_linear(x.contiguous(), packed, layer.weight, layer.bias, rows)
