// Self-test kernels for cuda_emu.h (built into the same library as tree_attention_emu.cpp):
// the warp primitives give CUDA's results, a missing __syncthreads is exposed, and a barrier not
// every thread reaches is reported as a deadlock instead of hanging.

#include "cuda_emu.h"

constexpr size_t kSelftestSmemBytes = 64 * 1024;
thread_local int selftest_smem[kSelftestSmemBytes / sizeof(int)];

// out[6 * tid + k]: xor(16), idx(lane 5), up(3), down(7), ballot(lane odd), all(lane < 40).
__global__ void selftest_warp_ops(int* out) {
  const int tid = threadIdx.x, lane = tid % 32;
  int* o = out + 6 * (blockIdx.x * blockDim.x + tid);
  o[0] = __shfl_xor_sync(0xffffffffu, tid, 16);
  o[1] = __shfl_sync(0xffffffffu, tid, 5);
  o[2] = __shfl_up_sync(0xffffffffu, tid, 3);
  o[3] = __shfl_down_sync(0xffffffffu, tid, 7);
  o[4] = static_cast<int>(__ballot_sync(0xffffffffu, lane % 2 == 1));
  o[5] = __all_sync(0xffffffffu, lane < 40) + 2 * __any_sync(0xffffffffu, lane == 31);
}

// Each thread writes its slot of shared memory and reads its neighbour's; without the barrier
// the neighbour may not have written yet.
__global__ void selftest_neighbour(int* out, int with_barrier) {
  extern __shared__ int selftest_smem[];
  const int tid = threadIdx.x;
  selftest_smem[tid] = 1000 * blockIdx.x + tid;
  if (with_barrier) __syncthreads();
  out[blockIdx.x * blockDim.x + tid] = selftest_smem[(tid + 1) % blockDim.x];
}

// Only the first warp reaches the barrier.
__global__ void selftest_divergent_barrier(int* out) {
  if (threadIdx.x < 32) __syncthreads();
  out[threadIdx.x] = 1;
}

namespace {
void* selftest_dynamic_smem() { return selftest_smem; }
}  // namespace

extern "C" int emu_selftest(const char* name, unsigned blocks, unsigned threads, int* out,
                            int arg, unsigned seed) {
  const std::string which(name);
  auto run = [&](auto body, size_t smem) {
    return cuda_emu::launch(dim3(blocks), dim3(threads), smem, selftest_dynamic_smem,
                            sizeof(selftest_smem), body, seed, 2);
  };
  if (which == "warp_ops") return run([=] { selftest_warp_ops(out); }, 0);
  if (which == "neighbour") {
    return run([=] { selftest_neighbour(out, arg); }, threads * sizeof(int));
  }
  if (which == "divergent_barrier") return run([=] { selftest_divergent_barrier(out); }, 0);
  cuda_emu::last_error() = "no self-test " + which;
  return -1;
}
