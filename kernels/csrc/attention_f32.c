/* Tree attention over the paged KV cache on CPU (fp32, AVX-512): the CPU twin of
 * tree_attention.cu, on the same metadata (kernels/attention_metadata.py).
 *
 * Query t of sequence b = q_seq_idx[t] attends, in ascending position order, to every KV
 * position < q_prefix_lens[t] and to tree_starts[b] + m for every bit m set in tree_masks[t]:
 *
 *   out[t, h, :] = sum_j softmax_j(scale * q[t, h] . k[l_j, h / g]) * v[l_j, h / g, :]
 *
 * q, out: [T, H, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D]; block_tables:
 * [B, max_blocks]; tree_masks: [T, 2] 64-bit words. Each (t, h) is computed by the same
 * operations in the same order whatever else is in the batch or the thread (two heads of one KV
 * head may share the loads of its K and V rows, never an operation): a query's output never
 * depends on its batch mates (batch-invariant). No gather, no padding.
 *
 * The exp loop vectorises through glibc's libmvec (expf declared SIMD below, built with
 * -fno-math-errno). Not -ffast-math: a shared library built with it sets flush-to-zero for the
 * whole process at load. Invisible positions are skipped, not set to -inf. D % 16 == 0, <= 256.
 * Built and loaded by kernels/cpu_attention.py.
 */
#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

/* glibc's libmvec has 16-lane expf (_ZGVeN16v_expf); math.h only says so under -ffast-math */
float expf(float) __attribute__((simd("notinbranch")));

#define MAX_CHUNKS 16 /* D / 16 */
#define MASK_WORDS 2  /* 128 tree nodes */

typedef struct {
  const float *k, *v;     /* the caches */
  const int32_t *table;   /* this sequence's block table */
  int block_size, row;    /* row = Hkv * D floats per position */
} Kv;

static inline int64_t slot(const Kv *kv, int l) {
  return ((int64_t)kv->table[l / kv->block_size] * kv->block_size + l % kv->block_size) * kv->row;
}

static inline float dot(const float *a, const float *b, int chunks) {
  __m512 acc = _mm512_setzero_ps();
  for (int c = 0; c < chunks; c++)
    acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + 16 * c), _mm512_loadu_ps(b + 16 * c), acc);
  return _mm512_reduce_add_ps(acc);
}

/* Visible positions of one query, ascending: the causal prefix, then the tree ancestors. */
static int visible(int32_t *pos, int prefix, int tree_start, const uint64_t *mask) {
  int n = 0;
  for (int l = 0; l < prefix; l++) pos[n++] = l;
  for (int m = 0; m < 64 * MASK_WORDS; m++)
    if ((mask[m / 64] >> (m % 64)) & 1) pos[n++] = tree_start + m;
  return n;
}

/* The cache offsets of a query's visible positions, once per query (not per head and
 * position: the block lookup divides by the block size) */
static void offsets(const Kv *kv, const int32_t *pos, int n, int64_t *off) {
  for (int j = 0; j < n; j++) off[j] = slot(kv, pos[j]);
}

/* `heads` (1 or 2, a compile-time constant) query heads that share one KV head (q, out: their
 * adjacent [D] rows; s: [heads, n] scores): each K and V row is loaded once for all of them,
 * and each head's arithmetic is the same operations in the same order as when it runs alone,
 * so its output is bitwise that. */
static inline __attribute__((always_inline)) void query_n(const float *q, const Kv *kv,
                                                          int head_off, const int64_t *off,
                                                          int n, float *s, float *out,
                                                          int chunks, float scale, int heads) {
  float m[2] = {-FLT_MAX, -FLT_MAX}, sum[2] = {0.0f, 0.0f};
  for (int j = 0; j < n; j++) {
    const float *kr = kv->k + off[j] + head_off;
    for (int h = 0; h < heads; h++) {
      float x = scale * dot(q + h * 16 * chunks, kr, chunks);
      s[h * n + j] = x;
      m[h] = x > m[h] ? x : m[h];
    }
  }
  for (int h = 0; h < heads; h++) {
    float *sh = s + h * n, mh = m[h];
#pragma omp simd
    for (int j = 0; j < n; j++) sh[j] = expf(sh[j] - mh);
    for (int j = 0; j < n; j++) sum[h] += sh[j];
  }
  __m512 acc[2][MAX_CHUNKS];
  for (int h = 0; h < heads; h++)
    for (int c = 0; c < chunks; c++) acc[h][c] = _mm512_setzero_ps();
  for (int j = 0; j < n; j++) {
    const float *vr = kv->v + off[j] + head_off;
    for (int c = 0; c < chunks; c++) {
      __m512 vc = _mm512_loadu_ps(vr + 16 * c);
      for (int h = 0; h < heads; h++)
        acc[h][c] = _mm512_fmadd_ps(_mm512_set1_ps(s[h * n + j]), vc, acc[h][c]);
    }
  }
  for (int h = 0; h < heads; h++) {
    __m512 inv = _mm512_set1_ps(1.0f / sum[h]);
    for (int c = 0; c < chunks; c++)
      _mm512_storeu_ps(out + 16 * (h * chunks + c), _mm512_mul_ps(acc[h][c], inv));
  }
}

/* query_n with the head size a compile-time constant for the usual ones (64, 128): the
 * accumulators then stay in registers instead of a stack array (the same operations in the
 * same order: bitwise the generic path's results). `pair`: two heads of one KV head at once. */
static void query(const float *q, const Kv *kv, int head_off, const int64_t *off, int n,
                  float *s, float *out, int chunks, float scale, int pair) {
#define QUERY(heads)                                                              \
  switch (chunks) {                                                               \
    case 4: query_n(q, kv, head_off, off, n, s, out, 4, scale, heads); return;      \
    case 8: query_n(q, kv, head_off, off, n, s, out, 8, scale, heads); return;      \
    default: query_n(q, kv, head_off, off, n, s, out, chunks, scale, heads); return; \
  }
  if (pair) {
    QUERY(2)
  }
  QUERY(1)
#undef QUERY
}

/* Returns 0, or -1 when scratch memory could not be allocated. `max_visible` bounds any
 * query's visible positions (max_seq_len + 128 is always enough). */
int specmesh_tree_attention(const float *q, const float *k_cache, const float *v_cache,
                            const int32_t *block_tables, int max_blocks, const int64_t *q_seq_idx,
                            const int32_t *q_prefix_lens, const int32_t *tree_starts,
                            const uint64_t *tree_masks, float *out, int T, int H, int Hkv, int D,
                            int block_size, int max_visible, float scale, int threads) {
  int failed = 0;
  int group = H / Hkv, chunks = D / 16;
#pragma omp parallel num_threads(threads) reduction(| : failed)
  {
    size_t cap = max_visible > 0 ? (size_t)max_visible : 1;
    float *s = malloc(sizeof(float) * cap * 2); /* two heads' scores */
    int32_t *pos = malloc(sizeof(int32_t) * cap);
    int64_t *off = malloc(sizeof(int64_t) * cap);
    if (!s || !pos || !off) {
      failed = 1;
    } else {
      int tid = omp_get_thread_num(), nt = omp_get_num_threads();
      /* (query, head) pairs split in contiguous runs, so a few queries still use every thread;
       * a thread lists a query's positions once per run it touches */
      int64_t pairs = (int64_t)T * H, per = (pairs + nt - 1) / nt;
      int64_t i0 = tid * per, i1 = i0 + per < pairs ? i0 + per : pairs;
      int t = -1, n = 0;
      Kv kv = {0};
      for (int64_t i = i0; i < i1; i++) {
        int h = (int)(i % H);
        if (i / H != t) {
          t = (int)(i / H);
          int64_t b = q_seq_idx[t];
          kv = (Kv){k_cache, v_cache, block_tables + b * max_blocks, block_size, Hkv * D};
          n = visible(pos, q_prefix_lens[t], tree_starts[b],
                      tree_masks + (int64_t)t * MASK_WORDS);
          offsets(&kv, pos, n, off);
        }
        /* heads h, h + 1 of one KV head (an even group size) together when both are ours */
        int pair = group % 2 == 0 && h % 2 == 0 && i + 1 < i1;
        query(q + ((int64_t)t * H + h) * D, &kv, (h / group) * D, off, n, s,
              out + ((int64_t)t * H + h) * D, chunks, scale, pair);
        i += pair;
      }
    }
    free(s);
    free(pos);
    free(off);
  }
  return failed ? -1 : 0;
}
