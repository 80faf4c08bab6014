"""Benchmark: the CUDA tree-attention kernel vs the PyTorch reference vs dense-mask SDPA.

    python -m specmesh.kernels.bench_tree_attention [--prefix 512,2048,8192] [--tree 16,64,128]
        [--batch 1,8,32] [--heads 32] [--kv-heads 8] [--head-dim 128] [--dtype f16]

Each sequence has `prefix` committed tokens and one draft tree of `tree` nodes (random shape),
all of them queried, as in one verification step of one layer. Columns:
  kernel / reference / sdpa   median ms; `sdpa` is F.scaled_dot_product_attention with a dense
                              boolean mask over K/V already gathered contiguously (its gather
                              is not timed, so it is a lower bound for a dense-mask approach)
  GB/s, %peak                 the kernel's bytes that must move (K, V of every visible position
                              once, q and the output) per second, against the GPU's peak
                              memory bandwidth from its device attributes
  max err                     |kernel - reference|
Without a GPU it says so and times the reference at a tiny size instead.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from specmesh.kernels import _cuda
from specmesh.kernels.attention_metadata import SequenceStep, build_metadata, to_device
from specmesh.kernels.reference import dense_mask, tree_attention_reference
from specmesh.kernels.tree import compile_tree

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Shape:
    batch: int
    prefix: int
    tree: int
    heads: int
    kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype


def make_inputs(shape: Shape, device: torch.device, seed: int = 0):
    """(q, k_cache, v_cache, meta) for one verification step; blocks are shuffled."""
    gen = torch.Generator().manual_seed(seed)
    blocks = -(-(shape.prefix + shape.tree) // shape.block_size)
    pool = torch.randperm(blocks * shape.batch, generator=gen).view(shape.batch, blocks)
    steps = []
    for b in range(shape.batch):
        parents = [int(torch.randint(-1, i, (1,), generator=gen)) if i else -1
                   for i in range(shape.tree)]
        tree = compile_tree(list(range(shape.tree)), parents)
        steps.append(SequenceStep(block_table=pool[b].tolist(), num_cached=shape.prefix,
                                  num_causal=0, tree_ancestors=tree.ancestors))
    meta = to_device(build_metadata(steps, shape.block_size), device)
    cache = (blocks * shape.batch, shape.block_size, shape.kv_heads, shape.head_dim)
    k_cache = torch.randn(cache, dtype=shape.dtype, device=device)
    v_cache = torch.randn(cache, dtype=shape.dtype, device=device)
    q = torch.randn(meta.num_tokens, shape.heads, shape.head_dim, dtype=shape.dtype,
                    device=device)
    return q, k_cache, v_cache, meta


def time_ms(fn, iters: int) -> float:
    """Median milliseconds of `fn()` over `iters` runs (CUDA events) after warm-up."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_bandwidth_gbs(index: int) -> float | None:
    """2 x memory clock x bus width, from the device attributes (None if not reported)."""
    try:
        from cuda.bindings import driver
    except ImportError:
        return None
    attr = driver.CUdevice_attribute
    driver.cuInit(0)
    err, dev = driver.cuDeviceGet(index)
    err1, clock_khz = driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE, dev)
    err2, bus_bits = driver.cuDeviceGetAttribute(
        attr.CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH, dev)
    ok = driver.CUresult.CUDA_SUCCESS
    if err != ok or err1 != ok or err2 != ok or not clock_khz or not bus_bits:
        return None
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9


def sdpa_dense(q, k_cache, v_cache, meta):
    """A closure running SDPA with a dense boolean mask over pre-gathered contiguous K/V."""
    batch, length = meta.num_seqs, meta.max_seq_len
    pos = torch.arange(length, device=q.device)
    slots = (meta.block_tables.long()[:, pos // meta.block_size] * meta.block_size
             + pos % meta.block_size)  # [B, L]
    flat = k_cache.shape[2:]
    k = k_cache.reshape(-1, *flat)[slots].transpose(1, 2)  # [B, Hkv, L, D]
    v = v_cache.reshape(-1, *flat)[slots].transpose(1, 2)
    q_b = q.view(batch, -1, *q.shape[1:]).transpose(1, 2)  # [B, H, n, D]
    mask = dense_mask(meta).view(batch, 1, -1, length)  # [B, 1, n, L]
    gqa = q.shape[1] != k_cache.shape[2]
    return lambda: F.scaled_dot_product_attention(q_b, k, v, attn_mask=mask, enable_gqa=gqa)


def bench_one(shape: Shape, iters: int, peak: float | None) -> str:
    device = torch.device("cuda")
    q, k_cache, v_cache, meta = make_inputs(shape, device)
    scale = shape.head_dim ** -0.5
    kernel = lambda: _cuda.tree_attention_cuda(q, k_cache, v_cache, meta, scale)  # noqa: E731
    reference = lambda: tree_attention_reference(q, k_cache, v_cache, meta, scale)  # noqa: E731
    err = (kernel().float() - reference().float()).abs().max().item()
    t_kernel, t_ref = time_ms(kernel, iters), time_ms(reference, iters)
    t_sdpa = time_ms(sdpa_dense(q, k_cache, v_cache, meta), iters)
    element = q.element_size()
    kv_bytes = 2 * shape.batch * (shape.prefix + shape.tree) * shape.kv_heads * shape.head_dim
    moved = element * (kv_bytes + 2 * q.numel())
    gbs = moved / t_kernel / 1e6
    pct = f"{100 * gbs / peak:5.1f}" if peak else "    ?"
    return (f"{shape.batch:5d} {shape.prefix:6d} {shape.tree:4d} {t_kernel:8.3f} {t_ref:8.3f} "
            f"{t_sdpa:8.3f} {gbs:7.0f} {pct} {t_ref / t_kernel:6.1f}x {t_sdpa / t_kernel:6.1f}x "
            f"{err:8.1e}")


def cpu_fallback() -> int:
    print("No CUDA device: the kernel cannot be timed here. Timing the PyTorch reference at a "
          "tiny size instead (batch 1, prefix 64, tree 8, fp32).")
    shape = Shape(1, 64, 8, 4, 2, 64, 16, torch.float32)
    q, k_cache, v_cache, meta = make_inputs(shape, torch.device("cpu"))
    start = time.perf_counter()
    for _ in range(10):
        tree_attention_reference(q, k_cache, v_cache, meta, 0.125)
    print(f"reference: {(time.perf_counter() - start) / 10 * 1e3:.3f} ms per call")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    parser.add_argument("--prefix", type=ints, default=[512, 2048, 8192])
    parser.add_argument("--tree", type=ints, default=[16, 64, 128])
    parser.add_argument("--batch", type=ints, default=[1, 8, 32])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="f16")
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        return cpu_fallback()
    index = torch.cuda.current_device()
    peak = peak_bandwidth_gbs(index)
    name = torch.cuda.get_device_name(index)
    print(f"{name}: peak memory bandwidth "
          f"{f'{peak:.0f} GB/s' if peak else 'unknown'}; heads {args.heads}/{args.kv_heads}, "
          f"head_dim {args.head_dim}, {args.dtype}, block_size {args.block_size}; times in ms")
    print("batch prefix tree   kernel reference    sdpa    GB/s %peak  vs ref vs sdpa  max err")
    for batch in args.batch:
        for prefix in args.prefix:
            for tree in args.tree:
                shape = Shape(batch, prefix, tree, args.heads, args.kv_heads, args.head_dim,
                              args.block_size, DTYPES[args.dtype])
                print(bench_one(shape, args.iters, peak), flush=True)
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
