"""int8 weights with one scale per output row (symmetric, round to nearest), for the draft.

    q, scale = quantize_rows(w)          # w [N, K] fp32 -> q [N, K] int8, scale [N] fp32
    w ~= q.float() * scale[:, None]      # |error| <= scale / 2 per weight

A draft model only proposes tokens: the target verifies every one, so greedy output is the
target's whatever the draft computes, and sampling stays lossless because the verifier uses
the draft distributions the draft reports (computed from these same weights). What int8 buys
is speed: on CPU a draft step is bound by how fast one core reads the draft's weights
(`kernels/csrc/linear_f16.c`, `specmesh_linear_q8`), and int8 halves the bytes of fp16. It may
change which tokens the draft proposes at near-ties (acceptance), never the output. The
target's weights are never quantized (`kernels.loader` refuses it for a verify model).
"""

from __future__ import annotations

import torch

QMAX = 127


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (q [N, K] int8 in [-127, 127], scale [N] fp32) with w ~= q * scale;
    an all-zero row gets scale 0 and q 0 (exact)."""
    w = w.detach().float()
    amax = w.abs().amax(dim=1)  # [N]
    scale = amax / QMAX  # [N]
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / safe[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)  # [N, K]
    return q.contiguous(), scale.contiguous()


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The fp32 weights int8 rows stand for: [N, K]."""
    return q.float() * scale[:, None]
