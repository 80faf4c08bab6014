"""The CPU tree-attention kernel (`kernels/csrc/attention_f32.c`): equal to the PyTorch
reference up to rounding on batches with trees, exact where one position is visible, and
batch-invariant (a sequence's outputs are bitwise the same alone and in any batch)."""

from __future__ import annotations

import shutil

import pytest
import torch

from specmesh.kernels import cpu_attention
from specmesh.kernels.attention_metadata import SequenceStep, build_metadata
from specmesh.kernels.reference import tree_attention_reference
from tests.kernels.test_cpu_linear import _cpu_has_avx512

BLOCK = 4


def test_built_wherever_it_can_be():
    if shutil.which("cc") is None or not _cpu_has_avx512():
        pytest.skip("no C compiler or no AVX-512 here: the PyTorch reference serves")
    assert cpu_attention._library() is not None


needs_kernel = pytest.mark.skipif(cpu_attention._library() is None,
                                  reason="CPU tree-attention kernel unavailable")


def _caches(gen, kv_heads=2, dim=32, blocks=40):
    return torch.randn(2, blocks, BLOCK, kv_heads, dim, generator=gen)  # [2, N, bs, Hkv, D]


def _chain(n: int) -> torch.Tensor:
    return torch.tril(torch.ones(n, n, dtype=torch.bool))  # [n, n] ancestor-or-self


@needs_kernel
def test_one_visible_position_returns_its_value():
    gen = torch.Generator().manual_seed(0)
    k_cache, v_cache = _caches(gen)
    meta = build_metadata([SequenceStep([6], 0, 1)], BLOCK)  # a first token sees itself
    q = torch.randn(1, 4, 32, generator=gen)
    out = cpu_attention.tree_attention_cpu(q, k_cache, v_cache, meta, 0.2)
    assert torch.equal(out[0], v_cache[6, 0].repeat_interleave(2, dim=0))


STEPS = [
    [SequenceStep([3, 9, 1, 17], 13, 1)],  # a decode step, scattered blocks
    [SequenceStep([2, 5, 8, 11, 14], 9, 2, _chain(5))],  # causal tokens + a chain tree
    [SequenceStep([0, 4, 30], 7, 1, torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0],
                                                  [1, 0, 1, 1]], dtype=torch.bool)),
     SequenceStep([6, 7], 2, 5), SequenceStep([12, 13, 20, 21, 22], 17, 1, _chain(2))],
]


@needs_kernel
@pytest.mark.parametrize("case", range(len(STEPS)))
@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 2, 32), (12, 6, 64), (4, 4, 16)])
def test_matches_the_reference(case, heads, kv_heads, dim):
    gen = torch.Generator().manual_seed(case)
    k_cache, v_cache = _caches(gen, kv_heads, dim)
    meta = build_metadata(STEPS[case], BLOCK)
    q = torch.randn(meta.num_tokens, heads, dim, generator=gen)
    got = cpu_attention.tree_attention_cpu(q, k_cache, v_cache, meta, dim ** -0.5)
    want = tree_attention_reference(q, k_cache, v_cache, meta, dim ** -0.5)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@needs_kernel
def test_a_sequence_gets_the_same_bits_alone_and_in_a_batch():
    gen = torch.Generator().manual_seed(3)
    k_cache, v_cache = _caches(gen, 2, 32)
    steps = STEPS[2]
    meta = build_metadata(steps, BLOCK)
    q = torch.randn(meta.num_tokens, 4, 32, generator=gen)
    together = cpu_attention.tree_attention_cpu(q, k_cache, v_cache, meta, 0.17)
    cu = meta.cu_q_lens.tolist()
    for b, step in enumerate(steps):
        alone_meta = build_metadata([step], BLOCK)
        alone = cpu_attention.tree_attention_cpu(q[cu[b]:cu[b + 1]], k_cache, v_cache,
                                                 alone_meta, 0.17)
        assert torch.equal(alone, together[cu[b]:cu[b + 1]])


@needs_kernel
@pytest.mark.parametrize("dim", [32, 64, 128])
@pytest.mark.parametrize("threads", [1, 2])
def test_a_head_gets_the_same_bits_paired_with_its_kv_mate_or_alone(dim, threads):
    """Two query heads of one KV head run together (shared K/V loads), or alone where a
    thread's share of heads starts or ends between them: the same bits either way, and as
    when the head is the only one (a KV head of its own)."""
    gen = torch.Generator().manual_seed(dim)
    heads, kv_heads = 6, 3  # 3 heads a thread at 2 threads: one of each thread's runs is odd
    k_cache, v_cache = _caches(gen, kv_heads, dim)
    meta = build_metadata(STEPS[2], BLOCK)
    q = torch.randn(meta.num_tokens, heads, dim, generator=gen)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        together = cpu_attention.tree_attention_cpu(q, k_cache, v_cache, meta, 0.11)
        for h in range(heads):
            g = h // (heads // kv_heads)
            alone = cpu_attention.tree_attention_cpu(
                q[:, h:h + 1].contiguous(), k_cache[..., g:g + 1, :].contiguous(),
                v_cache[..., g:g + 1, :].contiguous(), meta, 0.11)
            assert torch.equal(alone[:, 0], together[:, h])
    finally:
        torch.set_num_threads(before)


def test_fits_only_supported_tensors():
    q, k_cache = torch.randn(1, 4, 64), torch.randn(3, 4, 2, 64)
    assert cpu_attention.fits(q, k_cache) == (cpu_attention._library() is not None)
    assert not cpu_attention.fits(q[..., :24], k_cache[..., :24])  # head_dim % 16 != 0
    assert not cpu_attention.fits(q.double(), k_cache.double())


def test_loading_the_kernels_leaves_the_floating_point_mode_alone():
    """A library built with -ffast-math would set flush-to-zero for the whole process."""
    import numpy as np

    from specmesh.kernels import cpu_linear

    cpu_attention._library(), cpu_linear.available()
    assert float(torch.tensor([1e-40]) * 1.0) != 0.0
    assert float(np.float32(1e-40) * np.float32(1.0)) != 0.0
