"""The one-sequence CPU attention kernel (`kernels/csrc/attention_f32.c`): equal to softmax
attention up to rounding, exact on a one-position case, and per-query invariant."""

from __future__ import annotations

import shutil

import pytest
import torch

from kernels import cpu_attention
from tests.kernels.test_cpu_linear import _cpu_has_avx512


def test_built_wherever_it_can_be():
    if shutil.which("cc") is None or not _cpu_has_avx512():
        pytest.skip("no C compiler or no AVX-512 here: PyTorch attention serves")
    assert cpu_attention._library() is not None


needs_kernel = pytest.mark.skipif(cpu_attention._library() is None,
                                  reason="CPU attention kernel unavailable")


@needs_kernel
def test_one_visible_position_returns_its_value():
    q = torch.randn(2, 4, 16)  # [T, H, D]
    k, v = torch.randn(2, 5, 2, 16)  # [L, Hkv, D]
    visible = torch.zeros(2, 5, dtype=torch.bool)
    visible[0, 3] = visible[1, 0] = True
    out = cpu_attention.lone_attention(q, k, v, visible, 0.125)
    assert torch.equal(out[0], v[3].repeat_interleave(2, dim=0))  # heads 0,1 -> kv 0, ...
    assert torch.equal(out[1], v[0].repeat_interleave(2, dim=0))


@needs_kernel
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("shape", [(1, 12, 6, 64, 208), (5, 8, 4, 32, 40), (17, 4, 4, 16, 1)])
def test_matches_softmax_attention_and_is_per_query_invariant(masked, shape):
    tokens, heads, kv_heads, dim, length = shape
    gen = torch.Generator().manual_seed(tokens)
    q = torch.randn(tokens, heads, dim, generator=gen)
    k, v = torch.randn(2, length, kv_heads, dim, generator=gen)
    visible = None
    if masked:
        visible = torch.rand(tokens, length, generator=gen) > 0.3
        visible[:, 0] = True
    out = cpu_attention.lone_attention(q, k, v, visible, dim ** -0.5)
    want = cpu_attention._reference(q, k, v, visible, dim ** -0.5)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    for t in range(tokens):
        alone = cpu_attention.lone_attention(q[t:t + 1], k, v,
                                             None if visible is None else visible[t:t + 1],
                                             dim ** -0.5)
        assert torch.equal(alone[0], out[t])


def test_fits_only_supported_shapes():
    q, k = torch.randn(1, 4, 64), torch.randn(9, 2, 64)
    assert cpu_attention.fits(q, k) == (cpu_attention._library() is not None)
    assert not cpu_attention.fits(q[..., :24], k[..., :24])  # head_dim not a multiple of 16
    assert not cpu_attention.fits(q.double(), k.double())
