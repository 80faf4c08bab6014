/* One Llama decoder layer on CPU in one call, from fp16-resident projection weights (or int8
 * ones with row scales: a quantized draft, kernels/quantize.py):
 *
 *   xn = rms_norm(x, ln1);  qkv = xn @ Wqkv^T (+ b);  q, k = rope(q, k);  cache[slots] = k, v
 *   x += attention(q, cache) @ Wo^T (+ b);  xn = rms_norm(x, ln2)
 *   x += (silu(xn @ Wgate^T) * (xn @ Wup^T)) @ Wdown^T
 *
 * The same kernels the layer-by-op path calls (linear_f16.c, attention_f32.c, rms_norm_f32.c,
 * included below) in the same order, with the glue (bias, rotary, KV store, residuals, SiLU)
 * here instead of ~25 PyTorch ops per layer: on a small model that glue, not the arithmetic,
 * was most of a forward. Every row is computed alone (no result depends on the other rows).
 * The rotary and residual arithmetic is that of the PyTorch path operation for operation
 * (built with -ffp-contract=off: no fused multiply-adds in the glue); SiLU uses libmvec's expf.
 *
 * x: [T, hidden] fp32, updated in place. Scratch (Forward): xn [T, hidden], qkv [T, (H + 2 Hkv)
 * D], q [T, H, D], attn [T, H, D], h [T, hidden], gu [T, 2 ffn], act [T, ffn]. Caches: [blocks,
 * block_size, Hkv, D] fp32; slots [T] = block * block_size + offset. Built and loaded by
 * kernels/cpu_layer.py.
 */
#include "attention_f32.c"
#include "linear_f16.c"
#include "rms_norm_f32.c"

typedef struct {
  const void *qkv_w, *o_w, *gate_up_w, *down_w;   /* fp16 [N, K], or int8 [N, K] ... */
  const float *qkv_s, *o_s, *gate_up_s, *down_s;  /* ... with these row scales [N] (else NULL) */
  const float *qkv_b, *o_b;                       /* [N] or NULL */
  const float *ln1, *ln2;                           /* [hidden] */
  int stream;                                       /* prefetch the weights non-temporally */
} LayerWeights;

typedef struct {
  int T, hidden, ffn, H, Hkv, D, threads, attn_threads;
  int block_size, max_blocks, max_visible;
  float eps, scale;
  const float *cos, *sin;  /* [T, D] rotate-half tables */
  const int64_t *slots;    /* [T] */
  const int32_t *block_tables, *q_prefix_lens, *tree_starts;
  const int64_t *q_seq_idx;
  const uint64_t *tree_masks;
  float *xn, *qkv, *q, *attn, *h, *gu, *act; /* scratch */
} Forward;

static void add_bias(float *y, const float *b, int T, int N) {
  if (!b) return;
  for (int64_t t = 0; t < T; t++)
    for (int n = 0; n < N; n++) y[t * N + n] += b[n];
}

/* out = x * cos + rotate_half(x) * sin, one head of D values (the PyTorch formula) */
static void rope_head(const float *x, const float *c, const float *s, float *out, int D) {
  int half = D / 2;
  for (int d = 0; d < half; d++) out[d] = x[d] * c[d] + (-x[d + half]) * s[d];
  for (int d = half; d < D; d++) out[d] = x[d] * c[d] + x[d - half] * s[d];
}

/* q heads into f->q, rotated k heads and v into the caches at each row's slot */
static void rope_store(const Forward *f, float *k_cache, float *v_cache) {
  int D = f->D, qdim = f->H * D, kvdim = f->Hkv * D, width = qdim + 2 * kvdim;
  for (int64_t t = 0; t < f->T; t++) {
    const float *row = f->qkv + t * width, *c = f->cos + t * D, *s = f->sin + t * D;
    for (int h = 0; h < f->H; h++) rope_head(row + h * D, c, s, f->q + t * qdim + h * D, D);
    float *k = k_cache + f->slots[t] * kvdim, *v = v_cache + f->slots[t] * kvdim;
    for (int h = 0; h < f->Hkv; h++) rope_head(row + qdim + h * D, c, s, k + h * D, D);
    for (int i = 0; i < kvdim; i++) v[i] = row[qdim + kvdim + i];
  }
}

static void residual(float *x, const float *h, int64_t n) {
  for (int64_t i = 0; i < n; i++) x[i] += h[i];
}

static void silu_mul(const float *gu, float *act, int T, int ffn) {
  for (int64_t t = 0; t < T; t++) {
    const float *g = gu + t * 2 * ffn, *u = g + ffn;
    float *a = act + t * ffn;
#pragma omp simd
    for (int i = 0; i < ffn; i++) a[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
  }
}

/* y [T, N] = x [T, K] @ w^T: fp16 weights, or int8 ones with their row scales */
static void project(const void *w, const float *scale, const float *x, float *y, int T, int N,
                    int K, int threads, int stream) {
  if (scale)
    specmesh_linear_q8(w, scale, x, y, T, N, K, threads, stream);
  else
    specmesh_linear_f16(w, x, y, T, N, K, threads, stream);
}

/* Returns 0, or -1 when the attention's scratch could not be allocated. */
int specmesh_layer_f16(float *x, const LayerWeights *w, const Forward *f, float *k_cache,
                       float *v_cache) {
  int T = f->T, hidden = f->hidden, D = f->D, qdim = f->H * D;
  int width = qdim + 2 * f->Hkv * D;
  specmesh_rms_norm(x, w->ln1, f->xn, T, hidden, f->eps);
  project(w->qkv_w, w->qkv_s, f->xn, f->qkv, T, width, hidden, f->threads, w->stream);
  add_bias(f->qkv, w->qkv_b, T, width);
  rope_store(f, k_cache, v_cache);
  if (specmesh_tree_attention(f->q, k_cache, v_cache, f->block_tables, f->max_blocks,
                              f->q_seq_idx, f->q_prefix_lens, f->tree_starts, f->tree_masks,
                              f->attn, T, f->H, f->Hkv, D, f->block_size, f->max_visible,
                              f->scale, f->attn_threads))
    return -1;
  project(w->o_w, w->o_s, f->attn, f->h, T, hidden, qdim, f->threads, w->stream);
  add_bias(f->h, w->o_b, T, hidden);
  residual(x, f->h, (int64_t)T * hidden);
  specmesh_rms_norm(x, w->ln2, f->xn, T, hidden, f->eps);
  project(w->gate_up_w, w->gate_up_s, f->xn, f->gu, T, 2 * f->ffn, hidden, f->threads,
          w->stream);
  silu_mul(f->gu, f->act, T, f->ffn);
  project(w->down_w, w->down_s, f->act, f->h, T, hidden, f->ffn, f->threads, w->stream);
  residual(x, f->h, (int64_t)T * hidden);
  return 0;
}

/* Layers first..first+count-1 of an array of them in one call (one ctypes round trip a
 * forward instead of one a layer); each layer's caches start layer_floats floats further on.
 * Returns 0, or -1 as specmesh_layer_f16. */
int specmesh_layers_f16(float *x, const LayerWeights *w, int first, int count, const Forward *f,
                        float *k_pool, float *v_pool, int64_t layer_floats) {
  for (int l = first; l < first + count; l++)
    if (specmesh_layer_f16(x, w + l, f, k_pool + l * layer_floats, v_pool + l * layer_floats))
      return -1;
  return 0;
}

