/* Attention of one sequence's queries over its KV positions (CPU, fp32, AVX-512).
 *
 *   out[t, h, :] = sum_j softmax_j(scale * q[t, h] . k[l_j, h / g]) * v[l_j, h / g, :]
 *
 * over the positions l_j visible to query t (mask[t, l] != 0, or every l < L without a mask),
 * in ascending order. q, out: [T, H, D]; k, v: [L, Hkv, D]; mask: [T, L] bytes or NULL;
 * g = H / Hkv (grouped-query attention). Each (t, h) is computed alone by the same code,
 * whatever T or the thread: a query's output does not depend on the other queries.
 *
 * Compiled with -ffast-math so the exp loop vectorises (glibc's libmvec); every value is
 * finite (masked positions are skipped, not set to -inf). D % 16 == 0 and D <= 256.
 * Built and loaded by kernels/cpu_attention.py.
 */
#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#define MAX_CHUNKS 16 /* D / 16 */

static inline float dot(const float *a, const float *b, int chunks) {
  __m512 acc = _mm512_setzero_ps();
  for (int c = 0; c < chunks; c++)
    acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + 16 * c), _mm512_loadu_ps(b + 16 * c), acc);
  return _mm512_reduce_add_ps(acc);
}

static void query(const float *q, const float *k, const float *v, const uint8_t *mask,
                  float *out, float *s, int32_t *pos, int L, int row, int chunks, float scale) {
  int n = 0;
  float m = -FLT_MAX;
  for (int l = 0; l < L; l++) {
    if (mask && !mask[l]) continue;
    float x = scale * dot(q, k + (int64_t)l * row, chunks);
    pos[n] = l;
    s[n++] = x;
    m = x > m ? x : m;
  }
#pragma omp simd
  for (int j = 0; j < n; j++) s[j] = expf(s[j] - m);
  float sum = 0.0f;
  for (int j = 0; j < n; j++) sum += s[j];
  __m512 acc[MAX_CHUNKS];
  for (int c = 0; c < chunks; c++) acc[c] = _mm512_setzero_ps();
  for (int j = 0; j < n; j++) {
    __m512 p = _mm512_set1_ps(s[j]);
    const float *vr = v + (int64_t)pos[j] * row;
    for (int c = 0; c < chunks; c++) acc[c] = _mm512_fmadd_ps(p, _mm512_loadu_ps(vr + 16 * c), acc[c]);
  }
  __m512 inv = _mm512_set1_ps(1.0f / sum);
  for (int c = 0; c < chunks; c++) _mm512_storeu_ps(out + 16 * c, _mm512_mul_ps(acc[c], inv));
}

/* Returns 0, or -1 when scratch memory could not be allocated. */
int specmesh_lone_attention(const float *q, const float *k, const float *v, const uint8_t *mask,
                            float *out, int T, int H, int Hkv, int D, int L, float scale,
                            int threads) {
  int failed = 0;
  int group = H / Hkv, chunks = D / 16, row = Hkv * D;
#pragma omp parallel num_threads(threads) reduction(| : failed)
  {
    float *s = malloc(sizeof(float) * (L > 0 ? L : 1));
    int32_t *pos = malloc(sizeof(int32_t) * (L > 0 ? L : 1));
    if (!s || !pos) {
      failed = 1;
    } else {
      int tid = omp_get_thread_num(), nt = omp_get_num_threads();
      for (int i = tid; i < T * H; i += nt) {
        int t = i / H, h = i % H, kvh = h / group;
        query(q + (int64_t)i * D, k + kvh * D, v + kvh * D, mask ? mask + (int64_t)t * L : NULL,
              out + (int64_t)i * D, s, pos, L, row, chunks, scale);
      }
    }
    free(s);
    free(pos);
  }
  return failed ? -1 : 0;
}
