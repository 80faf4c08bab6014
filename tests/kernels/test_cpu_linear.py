"""The fp16-weight CPU kernel (`kernels/csrc/linear_f16.c`): exact on exact inputs, equal to
F.linear up to summation order, and batch-invariant (a row never depends on the others)."""

from __future__ import annotations

import pathlib
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from specmesh.kernels import cpu_linear
from specmesh.kernels.linear import attach_f16, project


def _cpu_has_avx512() -> bool:
    try:
        return " avx512f " in pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def test_built_wherever_it_can_be():
    """Where a compiler and AVX-512 exist the kernel must build and pass its self-check."""
    if shutil.which("cc") is None or not _cpu_has_avx512():
        pytest.skip("no C compiler or no AVX-512 here: the fp32 path serves")
    assert cpu_linear.available()


needs_kernel = pytest.mark.skipif(not cpu_linear.available(), reason="fp16 CPU kernel unavailable")


@needs_kernel
def test_exact_small_integers():
    w = torch.arange(3 * 16, dtype=torch.float32).reshape(3, 16) % 5 - 2  # [N=3, K=16]
    x = torch.stack([torch.ones(16), torch.arange(16.0)])  # [M=2, K=16]
    got = cpu_linear.linear_f16(x, cpu_linear.pack_panels(w.half()), 3,
                                bias=torch.tensor([0.5, 0.0, -1.0]))
    assert torch.equal(got, x @ w.t() + torch.tensor([0.5, 0.0, -1.0]))


@needs_kernel
@pytest.mark.parametrize("rows", [0, 1, 2, 5, 6, 7, 8, 9, 10, 14, 15, 16, 17, 40])
@pytest.mark.parametrize("shape", [(37, 96), (200, 90), (128, 16)])
def test_matches_f_linear_and_is_batch_invariant(rows, shape):
    """Panel tails of 3 vectors (37 outputs) and 1 (200 = 3 x 64 + 8), any width; 1-2 rows two
    panels at a time, more in passes of 7 (of 8 for 8 and 16) and a rest."""
    gen = torch.Generator().manual_seed(rows)
    w = (torch.randn(*shape, generator=gen) * 0.1).half()  # [N, K]
    x = torch.randn(rows, shape[1], generator=gen)  # [M, K]
    panels = cpu_linear.pack_panels(w)
    got = cpu_linear.linear_f16(x, panels, shape[0])
    assert got.shape == (rows, shape[0])
    torch.testing.assert_close(got, F.linear(x, w.float()), rtol=1e-5, atol=1e-5)
    for m in range(rows):
        assert torch.equal(cpu_linear.linear_f16(x[m:m + 1], panels, shape[0]), got[m:m + 1])


def test_panels_lay_64_outputs_side_by_side_for_every_k():
    w = torch.arange(70 * 3, dtype=torch.float32).reshape(70, 3)  # [N=70, K=3]
    panels = cpu_linear.pack_panels(w)  # [2, 3, 64]
    assert panels.shape == (2, 3, 64)
    assert torch.equal(panels[0, 1], w[:64, 1]) and torch.equal(panels[1, 2, :6], w[64:, 2])
    assert not panels[1, :, 6:].any()  # zeros past N
    assert torch.equal(cpu_linear.unpack_panels(panels, 70), w)


@needs_kernel
def test_panels_of_another_shape_are_refused():
    w = cpu_linear.pack_panels(torch.randn(70, 32).half())
    with pytest.raises(ValueError, match="panels"):
        cpu_linear.linear_f16(torch.randn(2, 32), w, 130)  # 3 panels' worth of outputs
    with pytest.raises(ValueError, match="panels"):
        cpu_linear.linear_f16(torch.randn(2, 48), w, 70)  # another width


def test_fits_only_exact_fp16_values():
    w = torch.randn(8, 32)
    assert not cpu_linear.fits(w)  # fp32 values
    assert cpu_linear.fits(w.half().float())
    assert cpu_linear.fits(w.half().float()[:, :24])  # any width
    assert not cpu_linear.fits(w.half())  # already fp16: not an fp32 serving weight


@needs_kernel
def test_attached_layer_projects_like_the_fp32_layer():
    layer = nn.Linear(64, 48, bias=True)
    with torch.no_grad():
        layer.weight.copy_(layer.weight.half().float())
    want = layer(torch.ones(3, 64))
    assert attach_f16(layer)
    assert layer.weight.numel() == 0 and layer.weight_f16.dtype == torch.float16
    torch.testing.assert_close(project(layer, torch.ones(3, 64)), want, rtol=1e-5, atol=1e-5)
