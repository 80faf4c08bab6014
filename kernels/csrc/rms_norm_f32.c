/* RMSNorm of fp32 rows on CPU (AVX-512), as HF's LlamaRMSNorm computes it:
 *
 *   y[r, :] = w * (x[r, :] / sqrt(mean(x[r, :]^2) + eps))
 *
 * x, y: [rows, dim]; w: [dim]; dim % 16 == 0. Each row's sum of squares is one 16-lane
 * accumulator in ascending order, then one lane reduction: a row's result never depends on the
 * other rows. PyTorch's CPU rms_norm runs ~6 small ops (~25-35 us a call at decode sizes); this
 * is one call. Built and loaded by kernels/cpu_norm.py.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

void specmesh_rms_norm(const float *x, const float *w, float *y, int rows, int dim, float eps) {
  for (int r = 0; r < rows; r++) {
    const float *xr = x + (int64_t)r * dim;
    float *yr = y + (int64_t)r * dim;
    __m512 acc = _mm512_setzero_ps();
    for (int d = 0; d < dim; d += 16) {
      __m512 v = _mm512_loadu_ps(xr + d);
      acc = _mm512_fmadd_ps(v, v, acc);
    }
    __m512 inv = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(acc) / (float)dim + eps));
    for (int d = 0; d < dim; d += 16)
      _mm512_storeu_ps(yr + d, _mm512_mul_ps(_mm512_loadu_ps(w + d),
                                             _mm512_mul_ps(_mm512_loadu_ps(xr + d), inv)));
  }
}
