"""CPU-side checks of the CUDA tree-attention kernel: NVRTC compiles it cleanly for sm_80 and
sm_90 (no GPU needed), the launch parameter block matches the kernel's, and the host-side
planning (query tiles, split-K) is right. The kernel's numbers are checked in test_cuda_kernel.py.
"""

from __future__ import annotations

import ctypes
import re
import subprocess
import sys

import pytest
import torch

from specmesh.kernels import _cuda

ARCHS = ["sm_80", "sm_90"]


def _nvrtc_or_skip() -> None:
    """Skip unless cuda-python and a loadable NVRTC are present; anything later is a failure."""
    try:
        from cuda.bindings import nvrtc
    except ImportError:
        pytest.skip("cuda-python is not installed (pip install 'specmesh[cuda]')")
    try:
        err, *_ = nvrtc.nvrtcVersion()
    except Exception as exc:  # cuda-bindings raises when it cannot find libnvrtc
        pytest.skip(f"NVRTC cannot be loaded: {exc} (pip install nvidia-cuda-nvrtc)")
    assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS


@pytest.mark.parametrize("arch", ARCHS)
def test_every_configuration_compiles_without_warnings(arch):
    _nvrtc_or_skip()
    program = _cuda.compile_program(arch)
    assert program.log == "", f"NVRTC log for {arch}:\n{program.log}"
    assert program.image == _cuda.compile_source(arch) and _cuda.compile_log(arch) == ""
    assert program.image[:4] == b"\x7fELF"  # a cubin
    for dtype in _cuda.DTYPE_NAMES.values():
        assert f"tree_attention_combine_{dtype}".encode() in program.image
        for head_dim in _cuda.HEAD_DIMS:
            assert f"tree_attention_{dtype}_d{head_dim}".encode() in program.image


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype,head_dim", [("f16", 128), ("bf16", 64), ("f32", 256)])
def test_single_configuration_compiles_without_warnings(arch, dtype, head_dim):
    """What a device builds on first use: one (dtype, head_dim) and its combine kernel."""
    _nvrtc_or_skip()
    program = _cuda.compile_program(arch, dtype, head_dim)
    assert program.log == "", f"NVRTC log for {arch} {dtype} d{head_dim}:\n{program.log}"
    assert f"tree_attention_{dtype}_d{head_dim}".encode() in program.image
    assert f"tree_attention_combine_{dtype}".encode() in program.image


def test_parameter_block_matches_the_kernel():
    """The ctypes mirror of TreeAttentionParams has the size the compiled kernel expects."""
    _nvrtc_or_skip()
    ptx = _cuda.compile_program("compute_80", "f16", 64).image.decode()
    match = re.search(r"\.entry tree_attention_f16_d64\(\s*\.param \.align (\d+) \.b8 "
                      r"tree_attention_f16_d64_param_0\[(\d+)\]", ptx)
    assert match, ptx[:2000]
    assert int(match.group(1)) == ctypes.alignment(_cuda.TreeAttentionParams)
    assert int(match.group(2)) == ctypes.sizeof(_cuda.TreeAttentionParams)


def test_compile_errors_are_typed():
    _nvrtc_or_skip()
    with pytest.raises(ValueError, match="arch"):
        _cuda.compile_program("ampere")
    with pytest.raises(ValueError, match="head_dim"):
        _cuda.compile_program("sm_80", "f16", 80)


def test_import_is_lazy():
    """Importing the dispatcher loads no cuda-python module beyond what torch itself loads, and
    compiles nothing."""
    code = (
        "import sys, torch\n"
        "before = {m for m in sys.modules if m.startswith('cuda')}\n"
        "from specmesh.kernels import _cuda, tree_attention\n"
        "added = {m for m in sys.modules if m.startswith('cuda')} - before\n"
        "assert not added, added\n"
        "assert _cuda.compile_program.cache_info().currsize == 0\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cpu_dispatch_runs_the_cpu_kernel_or_the_reference():
    from specmesh.kernels import cpu_attention
    from specmesh.kernels.reference import tree_attention_reference
    from specmesh.kernels.tree_attention import tree_attention
    from tests.kernels.test_tree_attention_reference import make_batch

    batch = make_batch(seed=1, prefix_lens=[5], tree_sizes=[4], num_causal=[1], block_size=4,
                       num_heads=2, num_kv_heads=1, head_dim=32)
    args = (batch.q, batch.k_cache, batch.v_cache, batch.meta, 0.2)
    got = tree_attention(*args)
    if cpu_attention.fits(batch.q, batch.k_cache):
        assert torch.equal(got, cpu_attention.tree_attention_cpu(*args))
        torch.testing.assert_close(got, tree_attention_reference(*args), rtol=1e-4, atol=1e-5)
    else:
        assert torch.equal(got, tree_attention_reference(*args))


def test_cpu_tensors_raise_cuda_unavailable():
    from tests.kernels.test_tree_attention_reference import make_batch

    batch = make_batch(seed=0, prefix_lens=[3], tree_sizes=[2], num_causal=[0], block_size=4,
                       num_heads=2, num_kv_heads=1, head_dim=32)
    with pytest.raises(_cuda.CudaUnavailable):
        _cuda.tree_attention_cuda(batch.q, batch.k_cache, batch.v_cache, batch.meta, 1.0)


def test_unsupported_inputs_are_reported():
    q = torch.zeros(3, 4, 80)
    kv = torch.zeros(2, 16, 2, 80)
    with pytest.raises(_cuda.UnsupportedInput, match="head_dim 80"):
        _cuda.check_inputs(q, kv, kv)
    kv64 = torch.zeros(2, 16, 2, 64, dtype=torch.float16)
    with pytest.raises(_cuda.UnsupportedInput, match="dtypes"):
        _cuda.check_inputs(torch.zeros(3, 4, 64), kv64, kv64)
    _cuda.check_inputs(torch.zeros(3, 4, 64, dtype=torch.float16), kv64, kv64)


# ------------------------------------------------------------------------------ host planning


@pytest.mark.parametrize("heads,kv_heads,rows,queries,chunks", [
    (8, 8, 1, 16, 1), (8, 4, 2, 8, 1), (32, 8, 4, 4, 1), (64, 8, 8, 2, 1),
    (28, 4, 7, 2, 1), (32, 1, 16, 1, 2), (48, 1, 16, 1, 3),
])
def test_plan_groups_query_heads_of_one_kv_head(heads, kv_heads, rows, queries, chunks):
    plan = _cuda.plan_launch(num_tokens=40, num_seqs=3, num_heads=heads, num_kv_heads=kv_heads,
                             head_dim=128, max_seq_len=100, num_sms=132)
    assert (plan.heads_per_cta, plan.queries_per_cta, plan.head_chunks) == (rows, queries, chunks)
    assert plan.num_tiles == -(-40 // queries) + 3
    assert plan.grid(kv_heads)[1] == kv_heads * chunks


def test_plan_splits_long_sequences_only_when_the_grid_is_small():
    decode = _cuda.plan_launch(num_tokens=1, num_seqs=1, num_heads=32, num_kv_heads=8,
                               head_dim=128, max_seq_len=8192, num_sms=132)
    assert decode.num_splits > 1
    assert decode.split_size % _cuda.KEYS_PER_TILE == 0
    assert decode.num_splits * decode.split_size >= 8192 > (decode.num_splits - 1) * decode.split_size
    short = _cuda.plan_launch(num_tokens=1, num_seqs=1, num_heads=32, num_kv_heads=8,
                              head_dim=128, max_seq_len=100, num_sms=132)
    assert short.num_splits == 1
    busy = _cuda.plan_launch(num_tokens=4096, num_seqs=32, num_heads=32, num_kv_heads=8,
                             head_dim=128, max_seq_len=8192, num_sms=132)
    assert busy.num_splits == 1
    forced = _cuda.plan_launch(num_tokens=3, num_seqs=1, num_heads=4, num_kv_heads=4,
                               head_dim=64, max_seq_len=1000, num_sms=1, num_splits=7)
    assert forced.num_splits == 7 and forced.split_size == 160


def test_shared_memory_fits_the_default_up_to_head_dim_128():
    assert _cuda.smem_bytes(128) <= 48 * 1024 < _cuda.smem_bytes(256) <= 99 * 1024


def test_query_tiles_cover_every_query_once_within_its_sequence():
    gen = torch.Generator().manual_seed(0)
    for queries_per_cta in (1, 2, 4, 16):
        q_lens = torch.randint(0, 40, (9,), generator=gen)
        q_lens[3] = 0  # a sequence with no queries
        cu = torch.cat([torch.zeros(1, dtype=torch.int64), q_lens.cumsum(0)]).to(torch.int32)
        num_tokens = int(cu[-1])
        num_tiles = -(-num_tokens // queries_per_cta) + len(q_lens)
        tile_seq, tile_start = _cuda.query_tiles(cu, num_tiles, queries_per_cta)
        assert tile_seq.dtype == tile_start.dtype == torch.int32
        covered = torch.zeros(num_tokens, dtype=torch.int64)
        for seq, start in zip(tile_seq.tolist(), tile_start.tolist()):
            if seq < 0:
                continue
            assert cu[seq] <= start < cu[seq + 1]
            covered[start: min(start + queries_per_cta, int(cu[seq + 1]))] += 1
        assert torch.equal(covered, torch.ones_like(covered))
