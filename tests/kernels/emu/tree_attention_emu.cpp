// CPU build of kernels/csrc/tree_attention.cu (included unchanged) on top of cuda_emu.h, with
// extern "C" launchers for tests/kernels/test_cuda_emulated.py (called through ctypes).
//
// Build (what the test does):
//   g++ -std=c++20 -O2 -fPIC -shared -pthread -fno-extern-tls-init -I tests/kernels/emu
//       -I kernels/csrc tests/kernels/emu/tree_attention_emu.cpp -o libtree_attention_emu.so
// -fno-extern-tls-init is required: the kernel's block-scope `extern __shared__` declaration
// becomes an `extern thread_local`, for which g++ otherwise calls a (missing) TLS init function.
// Every (dtype, head_dim) configuration is built unless -DSPECMESH_DTYPE / -DSPECMESH_HEAD_DIM
// pick one, exactly as for NVRTC.

#include <cstddef>

#include "cuda_emu.h"

// The kernel's `extern __shared__ float4 smem4[]` (a thread_local under cuda_emu.h): one array
// per worker thread, as large as the biggest opt-in shared memory of a current GPU (227 KiB).
constexpr size_t kDynamicSmemBytes = 227 * 1024;
namespace specmesh {
thread_local float4 smem4[kDynamicSmemBytes / sizeof(float4)];
}

#include "tree_attention.cu"

namespace {
void* dynamic_smem() { return specmesh::smem4; }
}  // namespace

extern "C" {

// `kernel`: the address of tree_attention_<dtype>_d<head_dim> (looked up by name by the caller).
int emu_launch_attention(void* kernel, unsigned gx, unsigned gy, unsigned gz, unsigned threads,
                         size_t shared_bytes, const TreeAttentionParams* params, unsigned seed,
                         int workers) {
  const auto fn = reinterpret_cast<void (*)(const TreeAttentionParams)>(kernel);
  const TreeAttentionParams p = *params;  // by value, as the driver passes it
  return cuda_emu::launch(dim3(gx, gy, gz), dim3(threads), shared_bytes, dynamic_smem,
                          sizeof(specmesh::smem4), [fn, &p] { fn(p); }, seed, workers);
}

// `kernel`: the address of tree_attention_combine_<dtype>.
int emu_launch_combine(void* kernel, unsigned gx, unsigned threads, const float* part_out,
                       const float* part_max, const float* part_sum, void* out, int num_splits,
                       int num_rows, int head_dim, unsigned seed, int workers) {
  const auto fn = reinterpret_cast<void (*)(const float*, const float*, const float*, void*, int,
                                            int, int)>(kernel);
  return cuda_emu::launch(
      dim3(gx), dim3(threads), 0, dynamic_smem, sizeof(specmesh::smem4),
      [=] { fn(part_out, part_max, part_sum, out, num_splits, num_rows, head_dim); }, seed,
      workers);
}

const char* emu_last_error() { return cuda_emu::last_error().c_str(); }

// sizeof(TreeAttentionParams) and the offset of every field, in declaration order, so that the
// ctypes mirror in kernels/_cuda.py can be checked against the struct the kernel really reads.
int emu_params_layout(long long* out, int capacity) {
  const long long layout[] = {
      sizeof(TreeAttentionParams), alignof(TreeAttentionParams),
#define F(name) offsetof(TreeAttentionParams, name)
      F(q), F(k_cache), F(v_cache), F(out), F(part_out), F(part_max), F(part_sum),
      F(block_tables), F(seq_lens), F(cu_q_lens), F(q_prefix_lens), F(tree_starts),
      F(tree_masks), F(tile_seq), F(tile_start), F(q_stride_t), F(q_stride_h),
      F(kv_stride_block), F(kv_stride_token), F(kv_stride_head), F(max_blocks), F(num_tokens),
      F(num_heads), F(num_kv_heads), F(heads_per_cta), F(queries_per_cta), F(block_size),
      F(split_size), F(num_splits), F(scale_log2),
#undef F
  };
  const int n = static_cast<int>(sizeof(layout) / sizeof(layout[0]));
  for (int i = 0; i < n && i < capacity; ++i) out[i] = layout[i];
  return n;
}

// The kernel's own fp16 / bf16 conversions over arrays (exhaustive checks against torch).
void emu_f16_to_float(const unsigned short* in, float* out, long long n) {
  for (long long i = 0; i < n; ++i) out[i] = specmesh::F16::to_float(in[i]);
}
void emu_float_to_f16(const float* in, unsigned short* out, long long n) {
  for (long long i = 0; i < n; ++i) out[i] = specmesh::F16::from_float(in[i]);
}
void emu_bf16_to_float(const unsigned short* in, float* out, long long n) {
  for (long long i = 0; i < n; ++i) out[i] = specmesh::BF16::to_float(in[i]);
}
void emu_float_to_bf16(const float* in, unsigned short* out, long long n) {
  for (long long i = 0; i < n; ++i) out[i] = specmesh::BF16::from_float(in[i]);
}

}  // extern "C"
