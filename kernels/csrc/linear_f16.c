/* Few-row projections against fp16-resident weights, accumulated in fp32 (CPU, AVX-512).
 *
 *   y[m, n] = sum_k x[m, k] * float(w[n, k])     w: fp16 [N, K], x: fp32 [M, K], y: fp32 [M, N]
 *
 * Decoding and verification multiply 1..17 rows by a large weight: the cost is one sweep over
 * the weight, so keeping it in fp16 halves the bytes streamed. Every fp16 value converts to fp32
 * exactly, so this is the fp32 product of the checkpoint's own weights; only the summation order
 * differs from sgemm.
 *
 * The weight is stored in panels (kernels/cpu_linear.py `pack_panels`): [ceil(N / 64), K, 64],
 * panel p holding outputs 64p..64p+63 for every k, zero-padded past N. A panel is one contiguous
 * stream (one sweep reads the weight front to back, which the hardware prefetchers follow at
 * full speed: a row-major [N, K] weight read 4 rows at a time streamed ~25% slower), and the 16
 * lanes of a vector are 16 outputs, so an accumulator is final when the k loop ends: no lane
 * reduction (by count ~10% of a tile's work at K = 768). Each y[m, n] is one fp32 lane
 * accumulated over k in ascending order by FMA, whatever M, the tile or the thread: a row's
 * result never depends on the other rows (batch-invariant by construction).
 *
 * Tiles of NB vectors (16 NB outputs) x MB input rows keep NB * MB accumulators in registers
 * (4 x 7 = 28 of the 32 zmm); each converted weight vector feeds MB FMAs, each broadcast input
 * NB. Rows past a pass are further passes over the same panel (from L2): 9 rows as 7 + 2
 * measured as fast as 6 + 3 and ~10% faster than 5 + 4. Built and loaded
 * by kernels/cpu_linear.py.
 *
 * `specmesh_linear_q8` is the same product from int8 weights (same panels) with one fp32 scale
 * per output (y[m, n] = scale[n] * sum_k x[m, k] * float(q[n, k]), kernels/quantize.py): half
 * the bytes again, for a draft model whose sweep is bound by how fast one core reads its weights.
 * The same tiles, order and batch invariance; only the weight load differs. */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#define PANEL 64 /* outputs per panel: NB vectors of 16 lanes */
#define NB 4
#define MB 7
#define WIDE 8 /* vectors of a 1-2 row tile: two adjacent panels at once */
#define AHEAD 1024 /* bytes of the panel stream prefetched ahead when streaming */

/* 16 weights of panel row `at` (vector j) as fp32: fp16 (q8 = 0) or int8 (q8 = 1) storage */
static inline __attribute__((always_inline)) __m512 load_w(const char *at, int j, int q8) {
  if (q8)
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)at + j)));
  return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)at + j));
}

/* y[m0..m0+mb, n..n+16nb] from panel `panel` (vectors 4..7, when nb > 4: from the next panel,
 * `next` bytes on); `valid` outputs exist (<= 16 nb) */
static inline __attribute__((always_inline)) void tile(const char *panel, int64_t next,
                                                       const float *scale, const float *x,
                                                       float *y, int N, int K, int n, int valid,
                                                       int nb, int m0, int mb, int nta, int q8) {
  __m512 acc[WIDE][MB + 1];
  for (int j = 0; j < nb; j++)
    for (int i = 0; i < mb; i++) acc[j][i] = _mm512_setzero_ps();
  const int row = q8 ? PANEL : 2 * PANEL; /* bytes per k in a panel */
  const int ahead = nta && m0 == 0;       /* the first pass reads it from memory */
  const float *xr = x + (int64_t)m0 * K;
  for (int k = 0; k < K; k++) {
    const char *at = panel + (int64_t)k * row;
    if (ahead)
      for (int half = 0; half < (nb > NB ? 2 : 1); half++) {
        _mm_prefetch(at + half * next + AHEAD, _MM_HINT_NTA);
        if (!q8) _mm_prefetch(at + half * next + AHEAD + 64, _MM_HINT_NTA);
      }
    __m512 wv[WIDE];
    for (int j = 0; j < nb; j++) wv[j] = load_w(at + (j < NB ? 0 : next), j % NB, q8);
    for (int i = 0; i < mb; i++) {
      __m512 xv = _mm512_set1_ps(xr[(int64_t)i * K + k]);
      for (int j = 0; j < nb; j++) acc[j][i] = _mm512_fmadd_ps(wv[j], xv, acc[j][i]);
    }
  }
  for (int j = 0; j < nb; j++) {
    int left = valid - 16 * j;
    __mmask16 keep = left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1);
    __m512 s = q8 ? _mm512_maskz_loadu_ps(keep, scale + n + 16 * j) : _mm512_setzero_ps();
    for (int i = 0; i < mb; i++) {
      __m512 v = q8 ? _mm512_mul_ps(acc[j][i], s) : acc[j][i];
      _mm512_mask_storeu_ps(y + (int64_t)(m0 + i) * N + n + 16 * j, keep, v);
    }
  }
}

/* mb, nb and q8 are compile-time constants in each call, so the accumulators stay in registers */
#define TILE(nb, mb) tile(panel, stride, scale, x, y, N, K, n, valid, nb, m0, mb, nta, q8)
#define ROWS(nb)                       \
  switch (mb) {                        \
    case 1: TILE(nb, 1); break;        \
    case 2: TILE(nb, 2); break;        \
    case 3: TILE(nb, 3); break;        \
    case 4: TILE(nb, 4); break;        \
    case 5: TILE(nb, 5); break;        \
    case 6: TILE(nb, 6); break;        \
    case 7: TILE(nb, 7); break;        \
    default: TILE(nb, MB + 1); break;  \
  }

/* Rows in passes of MB, the last one the rest; a multiple of MB + 1 rows in passes of MB + 1
 * (32 accumulators, a few spill: still 8 rows 9-15% faster than 7 + 1, 16 rows ~5% faster than
 * 7 + 7 + 2; 9 rows as 9, 8 + 1 or 7 + 2 alike; 10 as 8 + 2 3% slower than 7 + 3).
 * One or two rows take two full panels at a time (8 vectors): a 1-row tile of 4 vectors is 4
 * FMA chains, bound by the FMA's latency wherever the weights sit in cache (a draft model);
 * 8 chains run faster. Each output keeps its one chain, so the bits do not change. */
static inline __attribute__((always_inline)) void panels(const void *w, const float *scale,
                                                         const float *x, float *y, int M, int N,
                                                         int K, int p0, int p1, int nta,
                                                         int q8) {
  const int64_t stride = (int64_t)K * PANEL * (q8 ? 1 : 2); /* bytes per panel */
  for (int p = p0; p < p1; p++) {
    const char *panel = (const char *)w + p * stride;
    int n = p * PANEL, valid = N - n < PANEL ? N - n : PANEL, vectors = (valid + 15) / 16;
    if (M <= 2 && p + 1 < p1 && N - n >= 2 * PANEL) {
      const int m0 = 0;
      valid = 2 * PANEL;
      if (M == 1)
        TILE(WIDE, 1);
      else
        TILE(WIDE, 2);
      p++;
      continue;
    }
    const int most = M % (MB + 1) ? MB : MB + 1; /* 8, 16, 24 rows: passes of 8 */
    for (int m0 = 0; m0 < M;) {
      int mb = M - m0 < most ? M - m0 : most;
      switch (vectors) {
        case 1: ROWS(1) break;
        case 2: ROWS(2) break;
        case 3: ROWS(3) break;
        default: ROWS(NB) break;
      }
      m0 += mb;
    }
  }
}

static void panels_f16(const void *w, const float *x, float *y, int M, int N, int K, int p0,
                       int p1, int nta) {
  panels(w, 0, x, y, M, N, K, p0, p1, nta, 0);
}

static void panels_q8(const void *w, const float *scale, const float *x, float *y, int M, int N,
                      int K, int p0, int p1, int nta) {
  panels(w, scale, x, y, M, N, K, p0, p1, nta, 1);
}

/* Panels are split evenly across `threads` OpenMP threads.
 * `stream`: the weight is read once per forward and is part of a model far bigger than the
 * last-level cache, so its panels are prefetched non-temporally (PREFETCHNTA): streaming it
 * does not evict what other work keeps in L2/L3 (on a shared 2-core box: the draft model's
 * weights, the services' and client's own state), at no cost to this product. */
void specmesh_linear_f16(const uint16_t *w, const float *x, float *y, int M, int N, int K,
                         int threads, int stream) {
#pragma omp parallel num_threads(threads)
  {
    int t = omp_get_thread_num(), nt = omp_get_num_threads();
    int count = (N + PANEL - 1) / PANEL, per = (count + nt - 1) / nt;
    int p0 = t * per, p1 = p0 + per < count ? p0 + per : count;
    if (p0 < p1) panels_f16(w, x, y, M, N, K, p0, p1, stream);
  }
}

/* The same from int8 panels q [ceil(N / 64), K, 64] and their output scales [N]. */
void specmesh_linear_q8(const int8_t *w, const float *scale, const float *x, float *y, int M,
                        int N, int K, int threads, int stream) {
#pragma omp parallel num_threads(threads)
  {
    int t = omp_get_thread_num(), nt = omp_get_num_threads();
    int count = (N + PANEL - 1) / PANEL, per = (count + nt - 1) / nt;
    int p0 = t * per, p1 = p0 + per < count ? p0 + per : count;
    if (p0 < p1) panels_q8(w, scale, x, y, M, N, K, p0, p1, stream);
  }
}
