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
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#define NB 4
#define MB 6

static inline __attribute__((always_inline)) void tile(const uint16_t *w, const float *x,
                                                       float *y, int N, int K, int n, int nb,
                                                       int m0, int mb, int nta) {
  __m512 acc[NB][MB];
  for (int j = 0; j < nb; j++)
    for (int i = 0; i < mb; i++) acc[j][i] = _mm512_setzero_ps();
  /* the next tile's weight rows, fetched while this one computes (the first pass over a tile
   * only): without it the loads wait on memory and a 9-row product runs ~30% slower */
  const int ahead = m0 == 0 && n + 2 * nb <= N;
  const uint16_t *next = w + (int64_t)(n + nb) * K;
  for (int k = 0; k < K; k += 16) {
    __m512 wv[NB];
    if (ahead && nta)
      for (int j = 0; j < nb; j++)
        _mm_prefetch((const char *)(next + (int64_t)j * K + k), _MM_HINT_NTA);
    else if (ahead)
      for (int j = 0; j < nb; j++)
        _mm_prefetch((const char *)(next + (int64_t)j * K + k), _MM_HINT_T0);
    for (int j = 0; j < nb; j++)
      wv[j] = _mm512_cvtph_ps(
          _mm256_loadu_si256((const __m256i *)(w + (int64_t)(n + j) * K + k)));
    for (int i = 0; i < mb; i++) {
      __m512 xv = _mm512_loadu_ps(x + (int64_t)(m0 + i) * K + k);
      for (int j = 0; j < nb; j++) acc[j][i] = _mm512_fmadd_ps(wv[j], xv, acc[j][i]);
    }
  }
  for (int j = 0; j < nb; j++)
    for (int i = 0; i < mb; i++)
      y[(int64_t)(m0 + i) * N + n + j] = _mm512_reduce_add_ps(acc[j][i]);
}

/* mb is a compile-time constant in each call, so the accumulators stay in registers */
#define TILE(nb)                                              \
  switch (mb) {                                               \
    case 1: tile(w, x, y, N, K, n, nb, m0, 1, nta); break;    \
    case 2: tile(w, x, y, N, K, n, nb, m0, 2, nta); break;    \
    case 3: tile(w, x, y, N, K, n, nb, m0, 3, nta); break;    \
    case 4: tile(w, x, y, N, K, n, nb, m0, 4, nta); break;    \
    case 5: tile(w, x, y, N, K, n, nb, m0, 5, nta); break;    \
    default: tile(w, x, y, N, K, n, nb, m0, MB, nta); break;  \
  }

static void columns(const uint16_t *w, const float *x, float *y, int M, int N, int K, int n0,
                    int n1, int nta) {
  /* weight tiles outer (each read from memory once), input rows inner (they stay in cache) */
  int n = n0;
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
    if (n0 < n1) columns(w, x, y, M, N, K, n0, n1, stream);
  }
}
