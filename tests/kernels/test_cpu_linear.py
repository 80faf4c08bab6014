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
    got = cpu_linear.linear_f16(x, w.half(), bias=torch.tensor([0.5, 0.0, -1.0]))
    assert torch.equal(got, x @ w.t() + torch.tensor([0.5, 0.0, -1.0]))


@needs_kernel
@pytest.mark.parametrize("rows", [0, 1, 5, 6, 7, 8, 9, 10, 17, 40])
def test_matches_f_linear_and_is_batch_invariant(rows):
    gen = torch.Generator().manual_seed(rows)
    w = (torch.randn(37, 96, generator=gen) * 0.1).half()  # [N, K]: column tail, 6 k steps
    x = torch.randn(rows, 96, generator=gen)  # [M, K]
    got = cpu_linear.linear_f16(x, w)
    assert got.shape == (rows, 37)
    torch.testing.assert_close(got, F.linear(x, w.float()), rtol=1e-5, atol=1e-5)
    for m in range(rows):
        assert torch.equal(cpu_linear.linear_f16(x[m:m + 1], w), got[m:m + 1])


def test_fits_only_exact_fp16_values():
    w = torch.randn(8, 32)
    assert not cpu_linear.fits(w)  # fp32 values
    assert cpu_linear.fits(w.half().float())
    assert not cpu_linear.fits(w.half().float()[:, :24])  # width not a multiple of 16
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
