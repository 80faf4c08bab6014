"""The CUDA tree-attention kernel against the PyTorch reference (needs a GPU; skipped without).

The oracle is the reference run on the CPU in fp32 over the very same (rounded) inputs, so the
kernel's only legitimate differences are fp32 summation order, exp2 vs exp, and the final rounding
of its output to the input dtype. Tolerances (|kernel - reference| <= atol + rtol * |reference|):
  fp32: 2e-5 + 1e-4 |ref|   (summation order over up to a few thousand keys)
  fp16: 1e-3 + 2e-3 |ref|   (half an fp16 ulp of outputs of magnitude < 4)
  bf16: 8e-3 + 8e-3 |ref|   (half a bf16 ulp)
"""

from __future__ import annotations

import warnings

import pytest
import torch

from specmesh.kernels import _cuda
from specmesh.kernels.attention_metadata import to_device
from specmesh.kernels.reference import tree_attention_reference
from specmesh.kernels.tree_attention import tree_attention
from tests.kernels.test_tree_attention_reference import make_batch

pytestmark = pytest.mark.gpu

TOLERANCES = {
    torch.float32: dict(atol=2e-5, rtol=1e-4),
    torch.float16: dict(atol=1e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=8e-3, rtol=8e-3),
}


def run_both(batch, num_splits=None, meta_on_gpu=True):
    """(kernel output as fp32 on the CPU, fp32 CPU reference)."""
    scale = batch.q.shape[-1] ** -0.5
    expected = tree_attention_reference(batch.q.float(), batch.k_cache.float(),
                                        batch.v_cache.float(), batch.meta, scale)
    meta = to_device(batch.meta, torch.device("cuda")) if meta_on_gpu else batch.meta
    out = _cuda.tree_attention_cuda(batch.q.cuda(), batch.k_cache.cuda(), batch.v_cache.cuda(),
                                    meta, scale, num_splits=num_splits)
    torch.cuda.synchronize()
    assert out.dtype == batch.q.dtype and out.shape == batch.q.shape
    return out.float().cpu(), expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("seed", [0, 1])
def test_kernel_matches_reference_on_random_trees(dtype, head_dim, group, seed):
    """Prefixes crossing block boundaries, causal runs, trees of up to 128 nodes, GQA."""
    gen = torch.Generator().manual_seed(seed)
    num_seqs = 4
    batch = make_batch(
        seed=seed,
        prefix_lens=torch.randint(0, 300, (num_seqs,), generator=gen).tolist(),
        tree_sizes=[128, 0] + torch.randint(1, 64, (num_seqs - 2,), generator=gen).tolist(),
        num_causal=torch.randint(0, 4, (num_seqs,), generator=gen).tolist(),
        block_size=16, num_heads=2 * group, num_kv_heads=2, head_dim=head_dim, dtype=dtype)
    out, expected = run_both(batch)
    torch.testing.assert_close(out, expected, **TOLERANCES[dtype])


@pytest.mark.parametrize("num_splits", [None, 2, 7, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_k_on_long_prefixes(num_splits, dtype):
    """A decode-sized batch over thousands of cached positions: split-K plus the combine."""
    batch = make_batch(seed=5, prefix_lens=[4000, 2500, 17], tree_sizes=[16, 1, 40],
                       num_causal=[0, 1, 0], block_size=16, num_heads=8, num_kv_heads=2,
                       head_dim=128, dtype=dtype)
    out, expected = run_both(batch, num_splits=num_splits)
    torch.testing.assert_close(out, expected, **TOLERANCES[dtype])


@pytest.mark.parametrize("block_size", [1, 7, 32])
def test_odd_block_sizes_and_partial_tree(block_size):
    """Block sizes that are not powers of two; only the deepest tree level is queried."""
    batch = make_batch(seed=6, prefix_lens=[45, 3], tree_sizes=[30, 9], num_causal=[2, 0],
                       block_size=block_size, num_heads=4, num_kv_heads=1, head_dim=64,
                       query_subset=True)
    out, expected = run_both(batch, num_splits=3)
    torch.testing.assert_close(out, expected, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("head_dim,group", [(32, 7), (96, 3), (256, 32), (256, 1)])
def test_other_head_dims_and_groups(head_dim, group):
    """Head dims other than 64/128 (256 needs the shared-memory opt-in) and GQA groups that do
    not divide 16 or exceed it (several CTAs per KV head)."""
    batch = make_batch(seed=7, prefix_lens=[70, 0], tree_sizes=[20, 5], num_causal=[1, 6],
                       block_size=16, num_heads=group, num_kv_heads=1, head_dim=head_dim)
    out, expected = run_both(batch)
    torch.testing.assert_close(out, expected, **TOLERANCES[torch.float32])


def test_metadata_left_on_the_cpu_is_moved_once():
    batch = make_batch(seed=8, prefix_lens=[33], tree_sizes=[12], num_causal=[0],
                       block_size=16, num_heads=4, num_kv_heads=2, head_dim=64)
    out, expected = run_both(batch, meta_on_gpu=False)
    torch.testing.assert_close(out, expected, **TOLERANCES[torch.float32])
    assert any(key[0] == "cuda_meta" for key in batch.meta._dense if isinstance(key, tuple))


def test_dispatcher_runs_the_kernel_without_falling_back():
    batch = make_batch(seed=9, prefix_lens=[100], tree_sizes=[20], num_causal=[1],
                       block_size=16, num_heads=4, num_kv_heads=4, head_dim=128,
                       dtype=torch.float16)
    meta = to_device(batch.meta, torch.device("cuda"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback warns
        out = tree_attention(batch.q.cuda(), batch.k_cache.cuda(), batch.v_cache.cuda(), meta,
                             0.1)
    expected = tree_attention_reference(batch.q.float(), batch.k_cache.float(),
                                        batch.v_cache.float(), batch.meta, 0.1)
    torch.testing.assert_close(out.float().cpu(), expected, **TOLERANCES[torch.float16])
    assert _cuda.device_kernels(torch.cuda.current_device()) is _cuda.device_kernels(
        torch.cuda.current_device())


def test_unsupported_head_dim_falls_back_with_one_warning():
    batch = make_batch(seed=10, prefix_lens=[5], tree_sizes=[3], num_causal=[0],
                       block_size=4, num_heads=2, num_kv_heads=1, head_dim=80)
    meta = to_device(batch.meta, torch.device("cuda"))
    args = (batch.q.cuda(), batch.k_cache.cuda(), batch.v_cache.cuda(), meta, 0.1)
    with pytest.warns(RuntimeWarning, match="head_dim 80"):
        out = tree_attention(*args)
    expected = tree_attention_reference(batch.q, batch.k_cache, batch.v_cache, batch.meta, 0.1)
    torch.testing.assert_close(out.cpu(), expected, atol=1e-5, rtol=1e-5)
