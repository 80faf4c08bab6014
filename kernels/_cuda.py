"""The CUDA tree-attention kernel, in three parts: `cuda_compile` (NVRTC, per-architecture
images), `cuda_plan` (pure launch planning) and `cuda_launch` (per-device modules, the launch).
This module gathers their public names for callers and tests.
"""

from specmesh.kernels.cuda_compile import (
    DTYPE_NAMES,
    HEAD_DIMS,
    SOURCE_PATH,
    CompiledProgram,
    CudaUnavailable,
    KernelCompileError,
    UnsupportedInput,
    compile_log,
    compile_program,
    compile_source,
)
from specmesh.kernels.cuda_launch import (
    LOG2_E,
    DeviceKernels,
    KernelLauncher,
    TreeAttentionParams,
    check_inputs,
    device_kernels,
    run_tree_attention,
    tree_attention_cuda,
)
from specmesh.kernels.cuda_plan import (
    COMBINE_THREADS,
    KEYS_PER_TILE,
    MAX_SPLITS,
    MIN_SPLIT_KEYS,
    ROWS_PER_CTA,
    THREADS_PER_CTA,
    LaunchPlan,
    plan_launch,
    query_tiles,
    smem_bytes,
)

__all__ = [
    "COMBINE_THREADS",
    "CompiledProgram",
    "CudaUnavailable",
    "DTYPE_NAMES",
    "DeviceKernels",
    "HEAD_DIMS",
    "KEYS_PER_TILE",
    "KernelCompileError",
    "KernelLauncher",
    "LOG2_E",
    "LaunchPlan",
    "MAX_SPLITS",
    "MIN_SPLIT_KEYS",
    "ROWS_PER_CTA",
    "SOURCE_PATH",
    "THREADS_PER_CTA",
    "TreeAttentionParams",
    "UnsupportedInput",
    "check_inputs",
    "compile_log",
    "compile_program",
    "compile_source",
    "device_kernels",
    "plan_launch",
    "query_tiles",
    "run_tree_attention",
    "smem_bytes",
    "tree_attention_cuda",
]
