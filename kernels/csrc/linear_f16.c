/* Few-row projections against fp16-resident weights, accumulated in fp32 (CPU, AVX-512).
 *
 *   y[m, n] = sum_k x[m, k] * float(w[n, k])     w: fp16 [N, K], x: fp32 [M, K], y: fp32 [M, N]
 *
 * Decoding and verification multiply 1..17 rows by a large weight: the cost is one sweep over
 * the weight, so keeping it in fp16 halves the bytes streamed. Every fp16 value converts to fp32
 * exactly, so this is the fp32 product of the checkpoint's own weights; only the summation order
 * differs from sgemm. That order is fixed: each y[m, n] is one 16-lane accumulator over k in
 * ascending order, then one lane reduction, whatever M, the tile or the thread. So a row's result
 * never depends on the other rows: batch-invariant by construction.
 *
 * Tiles of NB weight rows x MB input rows keep NB * MB accumulators in registers (4 x 6 = 24 of
 * the 32 zmm); each converted weight vector feeds MB FMAs, each input vector NB.
 * Requires K % 16 == 0 (loads are unaligned). Built and loaded by kernels/cpu_linear.py.
 *
 * `specmesh_linear_q8` is the same product from int8 weights with one fp32 scale per output
 * row (y[m, n] = scale[n] * sum_k x[m, k] * float(q[n, k]), kernels/quantize.py): half the
 * bytes again, for a draft model whose sweep is bound by how fast one core reads its weights.
 * The same tiles, order and batch invariance; only the weight load differs.
 *
 * A tile's lane sums are reduced 16 accumulators at a time (reduce16) in the very order of
 * _mm512_reduce_add_ps: the same bits as reducing each alone (a lone row's tile still does,
 * and the batch-invariance test compares the two) in about half the instructions. */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#define NB 4
#define MB 6

/* weight rows n..n+nb as fp32, 16 values from k: fp16 (q8 = 0) or int8 (q8 = 1) storage */
static inline __attribute__((always_inline)) __m512 load_w(const void *w, int64_t row, int K,
                                                           int k, int q8) {
  if (q8)
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
        _mm_loadu_si128((const __m128i *)((const int8_t *)w + row * K + k))));
  return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)w + row * K + k)));
}

/* _mm512_reduce_add_ps of 16 vectors at once, in its exact order of additions (per vector:
 * high 256 bits + low, then high 128 + low, then lanes {0,1} + {2,3}, then lane 0 + lane 1),
 * so each sum is bitwise the one-vector reduction's: out[i] = the sum of v[i]'s lanes. */
static inline __attribute__((always_inline)) void reduce16(const __m512 *v, float *out) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; i++) /* [v lo256 + hi256 | w lo256 + hi256] */
    a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; i++) /* per vector: 128-bit block 0 + block 1 */
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; i++) /* lanes {0,1} + {2,3} within each block */
    c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0x44),
                         _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0xEE));
  __m512 r = _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], 0x88),
                           _mm512_shuffle_ps(c[0], c[1], 0xDD));
  static const int which[16] = {0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15};
  float lanes[16]; /* lane k holds the sum of v[which[k]] */
  _mm512_storeu_ps(lanes, r);
  for (int k = 0; k < 16; k++) out[which[k]] = lanes[k];
}

static inline __attribute__((always_inline)) void tile(const void *w, const float *scale,
                                                       const float *x, float *y, int N, int K,
                                                       int n, int nb, int m0, int mb, int nta,
                                                       int q8) {
  __m512 acc[NB][MB + 3]; /* 3 x 7..9 tiles too (`columns`) */
  for (int j = 0; j < nb; j++)
    for (int i = 0; i < mb; i++) acc[j][i] = _mm512_setzero_ps();
  /* the next tile's weight rows, fetched while this one computes (the first pass over a tile
   * only): without it the loads wait on memory and a 9-row product runs ~30% slower */
  const int ahead = m0 == 0 && n + 2 * nb <= N;
  const int esize = q8 ? 1 : 2; /* bytes per weight */
  const char *next = (const char *)w + (int64_t)(n + nb) * K * esize;
  for (int k = 0; k < K; k += 16) {
    __m512 wv[NB];
    /* one line per 64 bytes: every k step for fp16 weights, every other one for int8 */
    if (ahead && (!q8 || (k & 16) == 0)) {
      for (int j = 0; j < nb; j++) {
        const char *at = next + ((int64_t)j * K + k) * esize;
        if (nta)
          _mm_prefetch(at, _MM_HINT_NTA);
        else
          _mm_prefetch(at, _MM_HINT_T0);
      }
    }
    for (int j = 0; j < nb; j++) wv[j] = load_w(w, n + j, K, k, q8);
    for (int i = 0; i < mb; i++) {
      __m512 xv = _mm512_loadu_ps(x + (int64_t)(m0 + i) * K + k);
      for (int j = 0; j < nb; j++) acc[j][i] = _mm512_fmadd_ps(wv[j], xv, acc[j][i]);
    }
  }
  /* the nb * mb lane sums: past 8 of them 16 at a time (reduce16, the same bits), else one
   * by one (a lone row's 4 would pad 12) */
  __m512 all[32];
  float sums[32];
  int count = 0;
  for (int j = 0; j < nb; j++)
    for (int i = 0; i < mb; i++) all[count++] = acc[j][i];
  if (count > 8) {
    for (int c = count; c < (count + 15) / 16 * 16; c++) all[c] = _mm512_setzero_ps();
    for (int c = 0; c < count; c += 16) reduce16(all + c, sums + c);
  } else {
    for (int c = 0; c < count; c++) sums[c] = _mm512_reduce_add_ps(all[c]);
  }
  count = 0;
  for (int j = 0; j < nb; j++)
    for (int i = 0; i < mb; i++) {
      float sum = sums[count++];
      y[(int64_t)(m0 + i) * N + n + j] = q8 ? sum * scale[n + j] : sum;
    }
}

/* mb and q8 are compile-time constants in each call, so the accumulators stay in registers */
#define TILE(nb)                                                           \
  switch (mb) {                                                            \
    case 1: tile(w, scale, x, y, N, K, n, nb, m0, 1, nta, q8); break;      \
    case 2: tile(w, scale, x, y, N, K, n, nb, m0, 2, nta, q8); break;      \
    case 3: tile(w, scale, x, y, N, K, n, nb, m0, 3, nta, q8); break;      \
    case 4: tile(w, scale, x, y, N, K, n, nb, m0, 4, nta, q8); break;      \
    case 5: tile(w, scale, x, y, N, K, n, nb, m0, 5, nta, q8); break;      \
    default: tile(w, scale, x, y, N, K, n, nb, m0, MB, nta, q8); break;    \
  }

/* nb weight rows x all M (7..9) input rows in one tile */
#define THIN(nb)                                                           \
  switch (M) {                                                             \
    case 7: tile(w, scale, x, y, N, K, n, nb, 0, 7, nta, q8); break;       \
    case 8: tile(w, scale, x, y, N, K, n, nb, 0, 8, nta, q8); break;       \
    default: tile(w, scale, x, y, N, K, n, nb, 0, 9, nta, q8); break;      \
  }

static inline __attribute__((always_inline)) void columns(const void *w, const float *scale,
                                                          const float *x, float *y, int M,
                                                          int N, int K, int n0, int n1,
                                                          int nta, int q8) {
  /* weight tiles outer (each read from memory once), input rows inner (they stay in cache) */
  int n = n0;
  if (M >= 7 && M <= 9) { /* one pass of 3 x M tiles (21-27 accumulators), not 4 x 6 tiles and
                            a 1-3 row tail converting every weight vector again for 4-12 FMAs */
    for (; n + 3 <= n1; n += 3) THIN(3)
    for (; n < n1; n++) THIN(1)
    return;
  }
  for (; n + NB <= n1; n += NB)
    for (int m0 = 0; m0 < M; m0 += MB) {
      int mb = M - m0 < MB ? M - m0 : MB;
      TILE(NB)
    }
  for (; n < n1; n++)
    for (int m0 = 0; m0 < M; m0 += MB) {
      int mb = M - m0 < MB ? M - m0 : MB;
      TILE(1)
    }
}

static void columns_f16(const void *w, const float *x, float *y, int M, int N, int K, int n0,
                        int n1, int nta) {
  columns(w, 0, x, y, M, N, K, n0, n1, nta, 0);
}

static void columns_q8(const void *w, const float *scale, const float *x, float *y, int M,
                       int N, int K, int n0, int n1, int nta) {
  columns(w, scale, x, y, M, N, K, n0, n1, nta, 1);
}

/* Output columns are split evenly (in multiples of NB) across `threads` OpenMP threads.
 * `stream`: the weight is read once per forward and is part of a model far bigger than the
 * last-level cache, so its tiles are prefetched non-temporally (PREFETCHNTA): streaming it
 * does not evict what other work keeps in L2/L3 (on a shared 2-core box: the draft model's
 * weights, the services' and client's own state), at no cost to this product. */
void specmesh_linear_f16(const uint16_t *w, const float *x, float *y, int M, int N, int K,
                         int threads, int stream) {
#pragma omp parallel num_threads(threads)
  {
    int t = omp_get_thread_num(), nt = omp_get_num_threads();
    int per = ((N + nt - 1) / nt + NB - 1) / NB * NB;
    int n0 = t * per, n1 = n0 + per < N ? n0 + per : N;
    if (n0 < n1) columns_f16(w, x, y, M, N, K, n0, n1, stream);
  }
}

/* The same from int8 weights q [N, K] and their row scales [N]. */
void specmesh_linear_q8(const int8_t *w, const float *scale, const float *x, float *y, int M,
                        int N, int K, int threads, int stream) {
#pragma omp parallel num_threads(threads)
  {
    int t = omp_get_thread_num(), nt = omp_get_num_threads();
    int per = ((N + nt - 1) / nt + NB - 1) / NB * NB;
    int n0 = t * per, n1 = n0 + per < N ? n0 + per : N;
    if (n0 < n1) columns_q8(w, scale, x, y, M, N, K, n0, n1, stream);
  }
}
