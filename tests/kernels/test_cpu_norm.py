"""The CPU RMSNorm kernel (`kernels/csrc/rms_norm_f32.c`): HF's formula up to rounding, and a
row's result never depends on the other rows."""

from __future__ import annotations

import shutil

import pytest
import torch

from specmesh.kernels import cpu_norm
from tests.kernels.test_cpu_linear import _cpu_has_avx512


def test_built_wherever_it_can_be():
    if shutil.which("cc") is None or not _cpu_has_avx512():
        pytest.skip("no C compiler or no AVX-512 here: PyTorch's rms_norm serves")
    assert cpu_norm._library() is not None


needs_kernel = pytest.mark.skipif(cpu_norm._library() is None, reason="kernel unavailable")


@needs_kernel
def test_unit_rows_come_back_scaled_by_the_weight():
    x = torch.zeros(2, 16)
    x[0, 3], x[1, :] = 4.0, 1.0  # mean square 1: the norm is the identity up to eps
    w = torch.arange(16.0)
    got = cpu_norm.rms_norm(x, w, 0.0)
    assert torch.equal(got[1], w)
    assert torch.equal(got[0], w * x[0])


@needs_kernel
@pytest.mark.parametrize("rows,dim", [(1, 64), (5, 768), (17, 256), (0, 32)])
def test_matches_hf_and_rows_are_independent(rows, dim):
    gen = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, dim, generator=gen) * 3, torch.randn(dim, generator=gen)
    got = cpu_norm.rms_norm(x, w, 1e-5)
    torch.testing.assert_close(got, cpu_norm.reference(x, w, 1e-5), rtol=1e-5, atol=1e-6)
    for r in range(rows):
        assert torch.equal(cpu_norm.rms_norm(x[r:r + 1], w, 1e-5), got[r:r + 1])


def test_fits_only_fp32_rows_of_whole_vectors():
    w = torch.ones(32)
    assert cpu_norm.fits(torch.ones(2, 32), w) == (cpu_norm._library() is not None)
    assert not cpu_norm.fits(torch.ones(2, 24), torch.ones(24))
    assert not cpu_norm.fits(torch.ones(2, 32).double(), w.double())
    assert not cpu_norm.fits(torch.ones(2, 2, 32), w)
