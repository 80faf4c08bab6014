// Tree attention over a paged KV cache, flash-decoding style (compiled at run time by NVRTC).
//
// Semantics (kernels/attention_metadata.py): packed query t of sequence b attends to
//   * every KV position  <  q_prefix_lens[t]                        (the causal part), and
//   * position tree_starts[b] + m  for every bit m set in tree_masks[t]  (tree ancestors + self),
// clipped to seq_lens[b]. KV position p lives in block block_tables[b][p / block_size], offset
// p % block_size of k_cache / v_cache [num_blocks, block_size, num_kv_heads, head_dim].
//
// Work split. One CTA (4 warps) = one query tile x one KV head x one split of the KV range:
//   * query tile: up to QT consecutive queries of ONE sequence (host-built tile_seq/tile_start),
//   * rows: ROWS = 16 (query, head) pairs; the RH query heads sharing the KV head (GQA) of each
//     of the QT queries, so every K/V element loaded from memory serves all of them,
//   * split: KV positions [split * split_size, (split + 1) * split_size) of the tile's range.
// The CTA streams its KV range in tiles of KEYS = 32 positions through shared memory (as fp32).
// Warp w owns rows 4w .. 4w+3; for QK lane j owns key j, for PV lane l owns dims l + 32c.
// Softmax is online in the log2 domain (q pre-scaled by scale * log2 e), fp32 throughout.
// With one split the CTA writes the normalised output; otherwise it writes the unnormalised
// accumulator and its (max, sum) per row, and `tree_attention_combine_*` merges the splits.
//
// No headers: fp16 / bf16 are carried as raw 16-bit words and converted with bit arithmetic.

// Kernel arguments, passed by value (mirrored by a ctypes.Structure in kernels/_cuda.py).
struct TreeAttentionParams {
  const void* q;             // [T, H, D] with strides q_stride_t, q_stride_h (elements)
  const void* k_cache;       // [num_blocks, block_size, Hkv, D] with the kv strides (elements)
  const void* v_cache;       // same layout and strides as k_cache
  void* out;                 // [T, H, D] contiguous
  float* part_out;           // [num_splits, T, H, D] unnormalised accumulators (split-K only)
  float* part_max;           // [num_splits, T, H] running max, log2 domain (split-K only)
  float* part_sum;           // [num_splits, T, H] softmax denominators (split-K only)
  const int* block_tables;   // [B, max_blocks]
  const int* seq_lens;       // [B]
  const int* cu_q_lens;      // [B + 1]
  const int* q_prefix_lens;  // [T]
  const int* tree_starts;    // [B]
  const unsigned long long* tree_masks;  // [T, 2]
  const int* tile_seq;       // [num_tiles] sequence of each query tile, -1 = empty tile
  const int* tile_start;     // [num_tiles] first packed query of each tile
  long long q_stride_t, q_stride_h;
  long long kv_stride_block, kv_stride_token, kv_stride_head;
  int max_blocks, num_tokens, num_heads, num_kv_heads;
  int heads_per_cta;    // RH = min(H / Hkv, ROWS)
  int queries_per_cta;  // QT = ROWS / RH
  int block_size, split_size, num_splits;
  float scale_log2;     // softmax scale * log2(e)
};

namespace specmesh {

constexpr int KEYS = 32;         // KV positions per shared-memory tile (one per lane in QK)
constexpr int WARPS = 4;         // warps per CTA
constexpr int THREADS = WARPS * 32;
constexpr int ROWS = 16;         // (query, head) rows per CTA
constexpr int ROWS_PER_WARP = ROWS / WARPS;
constexpr int MASK_WORDS = 2;    // 128 tree nodes as two 64-bit words
constexpr int MAX_TREE_NODES = 64 * MASK_WORDS;
constexpr unsigned FULL_MASK = 0xffffffffu;

// ---------------------------------------------------------------- element types and conversion

struct F32 {
  typedef float storage;
  static constexpr int kVec = 4;  // elements per 16-byte load
  static __device__ __forceinline__ float to_float(float x) { return x; }
  static __device__ __forceinline__ float from_float(float x) { return x; }
};

struct F16 {
  typedef unsigned short storage;
  static constexpr int kVec = 8;
  // IEEE half -> float, exact for every input (normals, subnormals, inf, nan).
  static __device__ __forceinline__ float to_float(unsigned short h) {
    const unsigned sign = (static_cast<unsigned>(h) & 0x8000u) << 16;
    const unsigned magnitude = static_cast<unsigned>(h) & 0x7fffu;
    unsigned bits;
    if (magnitude >= 0x7c00u) {  // inf / nan: keep the payload
      bits = 0x7f800000u | (magnitude << 13);
    } else {  // re-bias by 2^(127 - 15); subnormals come out exact (no flush to zero)
      bits = __float_as_uint(__uint_as_float(magnitude << 13) * __uint_as_float(0x77800000u));
    }
    return __uint_as_float(sign | bits);
  }
  // float -> IEEE half, round to nearest even; overflow -> inf, nan -> quiet nan.
  static __device__ __forceinline__ unsigned short from_float(float value) {
    unsigned f = __float_as_uint(value);
    const unsigned sign = (f >> 16) & 0x8000u;
    f &= 0x7fffffffu;
    unsigned h;
    if (f >= 0x47800000u) {  // >= 65536: inf or nan (65520 .. 65536 is handled below)
      h = f > 0x7f800000u ? 0x7e00u : 0x7c00u;
    } else if (f < 0x38800000u) {  // below 2^-14: subnormal half or zero
      // Adding 0.5 aligns the 10 mantissa bits at the bottom; the FPU rounds to nearest even.
      h = __float_as_uint(__uint_as_float(f) + 0.5f) - 0x3f000000u;
    } else {
      const unsigned odd = (f >> 13) & 1u;
      f += 0xc8000fffu + odd;  // re-bias exponent by (15 - 127) << 23, round half to even
      h = f >> 13;             // 65520 and up round to 0x7c00 (inf), as they should
    }
    return static_cast<unsigned short>(sign | h);
  }
};

struct BF16 {
  typedef unsigned short storage;
  static constexpr int kVec = 8;
  static __device__ __forceinline__ float to_float(unsigned short h) {
    return __uint_as_float(static_cast<unsigned>(h) << 16);
  }
  static __device__ __forceinline__ unsigned short from_float(float value) {
    const unsigned f = __float_as_uint(value);
    if ((f & 0x7fffffffu) > 0x7f800000u) {
      return static_cast<unsigned short>((f >> 16) | 0x40u);  // quiet nan
    }
    return static_cast<unsigned short>((f + 0x7fffu + ((f >> 16) & 1u)) >> 16);
  }
};

// 16 bytes of storage -> kVec floats.
__device__ __forceinline__ void unpack(F32, const uint4& raw, float* out) {
  out[0] = __uint_as_float(raw.x);
  out[1] = __uint_as_float(raw.y);
  out[2] = __uint_as_float(raw.z);
  out[3] = __uint_as_float(raw.w);
}

template <typename E>
__device__ __forceinline__ void unpack(E, const uint4& raw, float* out) {
  const unsigned words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = E::to_float(static_cast<unsigned short>(words[i] & 0xffffu));
    out[2 * i + 1] = E::to_float(static_cast<unsigned short>(words[i] >> 16));
  }
}

// ---------------------------------------------------------------- warp helpers

__device__ __forceinline__ float neg_inf() { return __uint_as_float(0xff800000u); }

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    x = fmaxf(x, __shfl_xor_sync(FULL_MASK, x, offset));
  }
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    x += __shfl_xor_sync(FULL_MASK, x, offset);
  }
  return x;
}

// Index of the highest tree node set in a query's mask, or -1.
__device__ __forceinline__ int highest_node(unsigned long long word0, unsigned long long word1) {
  if (word1 != 0ull) return 127 - __clzll(static_cast<long long>(word1));
  if (word0 != 0ull) return 63 - __clzll(static_cast<long long>(word0));
  return -1;
}


// ---------------------------------------------------------------- the attention pass

template <typename E, int D>
__device__ __forceinline__ void attention_pass(const TreeAttentionParams& p) {
  static_assert(D % 32 == 0 && D <= 256, "head_dim must be a multiple of 32, at most 256");
  typedef typename E::storage T;
  constexpr int K_STRIDE = D + 4;  // padded K rows: float4 reads by 8 lanes hit 32 banks
  constexpr int DIMS_PER_LANE = D / 32;
  constexpr int VECS_PER_ROW = D / E::kVec;

  extern __shared__ float4 smem4[];
  float* q_s = reinterpret_cast<float*>(smem4);  // [ROWS][D], pre-scaled
  float* k_s = q_s + ROWS * D;                    // [KEYS][K_STRIDE]
  float* v_s = k_s + KEYS * K_STRIDE;             // [KEYS][D]

  const int tile = blockIdx.x;
  const int seq = p.tile_seq[tile];
  if (seq < 0) return;  // uniform over the CTA: an unused tile slot
  const int group = p.num_heads / p.num_kv_heads;
  const int chunks_per_group = (group + p.heads_per_cta - 1) / p.heads_per_cta;
  const int kv_head = blockIdx.y / chunks_per_group;
  const int head0 = kv_head * group + (blockIdx.y % chunks_per_group) * p.heads_per_cta;
  const int heads_here = min(p.heads_per_cta, group - (head0 - kv_head * group));
  const int q0 = p.tile_start[tile];
  const int num_q = min(p.queries_per_cta, p.cu_q_lens[seq + 1] - q0);
  const int num_rows = num_q * p.heads_per_cta;  // rows r = qi * RH + hh, valid: hh < heads_here
  const int tree_start = p.tree_starts[seq];
  const int seq_len = p.seq_lens[seq];

  // The CTA's KV range [0, end): the furthest position any of its queries can see.
  int end = 0;
  for (int qi = 0; qi < num_q; ++qi) {
    const int t = q0 + qi;
    const int top = highest_node(p.tree_masks[2 * t], p.tree_masks[2 * t + 1]);
    end = max(end, max(p.q_prefix_lens[t], top >= 0 ? tree_start + top + 1 : 0));
  }
  end = min(end, seq_len);
  const int lo = blockIdx.z * p.split_size;
  const int hi = min(end, lo + p.split_size);

  // Stage the (pre-scaled) queries; invalid rows are zero and never see a key.
  const T* q = static_cast<const T*>(p.q);
  for (int i = threadIdx.x; i < ROWS * D; i += THREADS) {
    const int r = i / D, d = i % D;
    const int qi = r / p.heads_per_cta, hh = r % p.heads_per_cta;
    float x = 0.f;
    if (r < num_rows && hh < heads_here) {
      const long long off = (q0 + qi) * p.q_stride_t + (head0 + hh) * p.q_stride_h + d;
      x = E::to_float(q[off]) * p.scale_log2;
    }
    q_s[i] = x;
  }

  // Per-row visibility of this warp's rows.
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int prefix[ROWS_PER_WARP];
  unsigned long long mask0[ROWS_PER_WARP], mask1[ROWS_PER_WARP];
  bool warp_active = false;
#pragma unroll
  for (int i = 0; i < ROWS_PER_WARP; ++i) {
    const int r = warp * ROWS_PER_WARP + i;
    const int qi = r / p.heads_per_cta, hh = r % p.heads_per_cta;
    prefix[i] = 0;
    mask0[i] = mask1[i] = 0ull;
    if (r < num_rows && hh < heads_here) {
      const int t = q0 + qi;
      prefix[i] = p.q_prefix_lens[t];
      mask0[i] = p.tree_masks[2 * t];
      mask1[i] = p.tree_masks[2 * t + 1];
      warp_active = true;
    }
  }

  float row_max[ROWS_PER_WARP], row_sum[ROWS_PER_WARP], acc[ROWS_PER_WARP][DIMS_PER_LANE];
#pragma unroll
  for (int i = 0; i < ROWS_PER_WARP; ++i) {
    row_max[i] = neg_inf();
    row_sum[i] = 0.f;
#pragma unroll
    for (int c = 0; c < DIMS_PER_LANE; ++c) acc[i][c] = 0.f;
  }

  const T* k_cache = static_cast<const T*>(p.k_cache);
  const T* v_cache = static_cast<const T*>(p.v_cache);
  const int* table = p.block_tables + static_cast<long long>(seq) * p.max_blocks;
  const long long head_off = kv_head * p.kv_stride_head;

  for (int base = lo; base < hi; base += KEYS) {
    __syncthreads();  // the previous tile (and, first time, q_s) is fully written / consumed
    // Load K and V for positions base .. base + KEYS - 1 as fp32; positions >= hi read as zero.
    for (int i = threadIdx.x; i < KEYS * VECS_PER_ROW; i += THREADS) {
      const int j = i / VECS_PER_ROW, d = (i % VECS_PER_ROW) * E::kVec;
      const int pos = base + j;
      float kf[E::kVec], vf[E::kVec];
      if (pos < hi) {
        const long long slot = static_cast<long long>(table[pos / p.block_size]) *
                               p.kv_stride_block + (pos % p.block_size) * p.kv_stride_token;
        const long long off = slot + head_off + d;
        unpack(E(), *reinterpret_cast<const uint4*>(k_cache + off), kf);
        unpack(E(), *reinterpret_cast<const uint4*>(v_cache + off), vf);
      } else {
#pragma unroll
        for (int e = 0; e < E::kVec; ++e) kf[e] = vf[e] = 0.f;
      }
#pragma unroll
      for (int e = 0; e < E::kVec; e += 4) {
        *reinterpret_cast<float4*>(k_s + j * K_STRIDE + d + e) =
            make_float4(kf[e], kf[e + 1], kf[e + 2], kf[e + 3]);
        *reinterpret_cast<float4*>(v_s + j * D + d + e) =
            make_float4(vf[e], vf[e + 1], vf[e + 2], vf[e + 3]);
      }
    }
    __syncthreads();
    if (!warp_active) continue;  // warp-uniform; the barriers above are reached by every warp

    // Scores: lane owns key `lane`, all four of the warp's rows.
    float score[ROWS_PER_WARP];
#pragma unroll
    for (int i = 0; i < ROWS_PER_WARP; ++i) score[i] = 0.f;
    const float* q_rows = q_s + warp * ROWS_PER_WARP * D;
#pragma unroll 4
    for (int d = 0; d < D; d += 4) {
      const float4 k4 = *reinterpret_cast<const float4*>(k_s + lane * K_STRIDE + d);
#pragma unroll
      for (int i = 0; i < ROWS_PER_WARP; ++i) {
        const float4 q4 = *reinterpret_cast<const float4*>(q_rows + i * D + d);
        score[i] += q4.x * k4.x + q4.y * k4.y + q4.z * k4.z + q4.w * k4.w;
      }
    }

    // Mask, then the online-softmax update of each row.
    const int pos = base + lane;
    const int node = pos - tree_start;
    float prob[ROWS_PER_WARP];
#pragma unroll
    for (int i = 0; i < ROWS_PER_WARP; ++i) {
      bool visible = pos < prefix[i];
      if (node >= 0 && node < MAX_TREE_NODES) {
        const unsigned long long word = node < 64 ? mask0[i] : mask1[i];
        visible = visible || ((word >> (node & 63)) & 1ull);
      }
      visible = visible && pos < hi;
      const float s = visible ? score[i] : neg_inf();
      const float new_max = fmaxf(row_max[i], warp_max(s));
      const float ref = new_max == neg_inf() ? 0.f : new_max;  // all masked so far: no NaN
      const float rescale = exp2f(row_max[i] - ref);
      prob[i] = exp2f(s - ref);
      row_sum[i] = row_sum[i] * rescale + warp_sum(prob[i]);
      row_max[i] = new_max;
#pragma unroll
      for (int c = 0; c < DIMS_PER_LANE; ++c) acc[i][c] *= rescale;
    }

    // Weighted values: lane owns dims lane + 32c; key j's probability comes from lane j.
#pragma unroll 4
    for (int j = 0; j < KEYS; ++j) {
      float pj[ROWS_PER_WARP];
#pragma unroll
      for (int i = 0; i < ROWS_PER_WARP; ++i) pj[i] = __shfl_sync(FULL_MASK, prob[i], j);
#pragma unroll
      for (int c = 0; c < DIMS_PER_LANE; ++c) {
        const float v = v_s[j * D + lane + 32 * c];
#pragma unroll
        for (int i = 0; i < ROWS_PER_WARP; ++i) acc[i][c] += pj[i] * v;
      }
    }
  }

  // Write this warp's rows.
#pragma unroll
  for (int i = 0; i < ROWS_PER_WARP; ++i) {
    const int r = warp * ROWS_PER_WARP + i;
    const int qi = r / p.heads_per_cta, hh = r % p.heads_per_cta;
    if (r >= num_rows || hh >= heads_here) continue;
    const long long row = static_cast<long long>(q0 + qi) * p.num_heads + head0 + hh;
    if (p.num_splits == 1) {
      const float inv = row_sum[i] > 0.f ? 1.f / row_sum[i] : 0.f;
      T* out = static_cast<T*>(p.out) + row * D;
#pragma unroll
      for (int c = 0; c < DIMS_PER_LANE; ++c) out[lane + 32 * c] = E::from_float(acc[i][c] * inv);
    } else {
      const long long part = static_cast<long long>(blockIdx.z) * p.num_tokens * p.num_heads + row;
      float* out = p.part_out + part * D;
#pragma unroll
      for (int c = 0; c < DIMS_PER_LANE; ++c) out[lane + 32 * c] = acc[i][c];
      if (lane == 0) {
        p.part_max[part] = row_max[i];
        p.part_sum[part] = row_sum[i];
      }
    }
  }
}

// ---------------------------------------------------------------- split-K combine

// One CTA per (token, head) row: out = sum_s acc_s 2^(m_s - M) / sum_s l_s 2^(m_s - M).
template <typename E>
__device__ __forceinline__ void combine_splits(const float* part_out, const float* part_max,
                                               const float* part_sum, void* out_raw,
                                               int num_splits, int num_rows, int head_dim) {
  typedef typename E::storage T;
  const long long row = blockIdx.x;
  const long long stride = num_rows;  // between splits
  float global_max = neg_inf();
  for (int s = 0; s < num_splits; ++s) {
    if (part_sum[s * stride + row] > 0.f) {
      global_max = fmaxf(global_max, part_max[s * stride + row]);
    }
  }
  float denom = 0.f;
  for (int s = 0; s < num_splits; ++s) {
    const float l = part_sum[s * stride + row];
    if (l > 0.f) denom += l * exp2f(part_max[s * stride + row] - global_max);
  }
  const float inv = denom > 0.f ? 1.f / denom : 0.f;
  T* out = static_cast<T*>(out_raw) + row * head_dim;
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float total = 0.f;
    for (int s = 0; s < num_splits; ++s) {
      const long long part = s * stride + row;
      if (part_sum[part] > 0.f) {
        total += part_out[part * head_dim + d] * exp2f(part_max[part] - global_max);
      }
    }
    out[d] = E::from_float(total * inv);
  }
}

}  // namespace specmesh

// ---------------------------------------------------------------- entry points (fixed names)
// tree_attention_<dtype>_d<head_dim>(TreeAttentionParams) and tree_attention_combine_<dtype>(...).

#define SPECMESH_ATTENTION(DTYPE, E, D)                                 \
  extern "C" __global__ void __launch_bounds__(specmesh::THREADS)       \
      tree_attention_##DTYPE##_d##D(const TreeAttentionParams p) {      \
    specmesh::attention_pass<specmesh::E, D>(p);                         \
  }

#define SPECMESH_COMBINE(DTYPE, E)                                                             \
  extern "C" __global__ void tree_attention_combine_##DTYPE(                                   \
      const float* part_out, const float* part_max, const float* part_sum, void* out,           \
      int num_splits, int num_rows, int head_dim) {                                             \
    specmesh::combine_splits<specmesh::E>(part_out, part_max, part_sum, out, num_splits,        \
                                          num_rows, head_dim);                                  \
  }

// Building one configuration: -DSPECMESH_DTYPE=f16 -DSPECMESH_HEAD_DIM=128 (what kernels/_cuda.py
// does on first use, under a second each); with neither defined, every configuration is built.
#if defined(SPECMESH_DTYPE) && defined(SPECMESH_HEAD_DIM)
#define SPECMESH_ELEMENT_f32 F32
#define SPECMESH_ELEMENT_f16 F16
#define SPECMESH_ELEMENT_bf16 BF16
#define SPECMESH_CAT(a, b) a##b
#define SPECMESH_ELEMENT(DTYPE) SPECMESH_CAT(SPECMESH_ELEMENT_, DTYPE)
#define SPECMESH_ONE(DTYPE, D)                            \
  SPECMESH_ATTENTION(DTYPE, SPECMESH_ELEMENT(DTYPE), D) \
  SPECMESH_COMBINE(DTYPE, SPECMESH_ELEMENT(DTYPE))
#define SPECMESH_EXPAND(DTYPE, D) SPECMESH_ONE(DTYPE, D)
SPECMESH_EXPAND(SPECMESH_DTYPE, SPECMESH_HEAD_DIM)
#else
#define SPECMESH_ALL_DIMS(DTYPE, E) \
  SPECMESH_ATTENTION(DTYPE, E, 32)  \
  SPECMESH_ATTENTION(DTYPE, E, 64)  \
  SPECMESH_ATTENTION(DTYPE, E, 96)  \
  SPECMESH_ATTENTION(DTYPE, E, 128) \
  SPECMESH_ATTENTION(DTYPE, E, 160) \
  SPECMESH_ATTENTION(DTYPE, E, 192) \
  SPECMESH_ATTENTION(DTYPE, E, 224) \
  SPECMESH_ATTENTION(DTYPE, E, 256) \
  SPECMESH_COMBINE(DTYPE, E)
SPECMESH_ALL_DIMS(f32, F32)
SPECMESH_ALL_DIMS(f16, F16)
SPECMESH_ALL_DIMS(bf16, BF16)
#endif
