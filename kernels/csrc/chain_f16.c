/* A greedy draft chain, several depths in one call (CPU).
 *
 * A chain draft feeds its own argmax back one token at a time: each depth is a 1-row forward
 * per sequence whose only inputs are the previous depth's token and position. Between the
 * depths the Python path built metadata, looked up embeddings and rope rows, ran the norm, the
 * LM head and an argmax: ~0.3-0.5 ms of interpreter work per depth for a ~0.4-1 ms forward
 * (more when the draft service wakes cold). Here the whole loop runs in C over the same
 * kernels (layer_f16.c: the fused decoder layer; rms_norm_f32.c; linear_f16.c), so every depth
 * computes exactly what the Python path computes: the same embeddings, rope rows, layer
 * arithmetic, norm, LM head product and argmax (first index of the maximum logit).
 *
 * For b in [0, B): tokens[b] sits at positions[b] (not yet in the KV cache); each of `steps`
 * depths writes its KV at the slot of positions[b] (block table row b), takes the argmax of its
 * logits as the next token into out[b * steps + s], and advances tokens[b] and positions[b].
 * The caller reserved the blocks. Returns 0, or -1 when the attention's scratch could not be
 * allocated. Built and loaded by kernels/cpu_chain.py.
 *
 * Sampled rows (`expo` set, temperature[b] > 0): instead of the argmax, each depth warps the
 * row's logits as kernels/sampling.py does (temperature, top-k, top-p, softmax), rounds the
 * distribution to fp16 and renormalises it (what the verifier decodes from the wire), writes
 * it to q_out[b, s] and draws the token by the exponential race of
 * `sample_without_replacement` with k = 1: the v with q_v > 0 minimising expo[b, s, v] / q_v,
 * the exponentials drawn beforehand from the request's generator.
 *
 * `logits_out` set: each depth's logits are also kept there (a dynamic tree chooses its leaves,
 * the draft's next choices along the chain, from them after the call).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "layer_f16.c"

typedef struct {
  int B, steps, vocab, layers, max_rope, lm_stream;
  int64_t layer_floats;             /* one layer's slice of the K (and V) pool, in floats */
  const float *embed;               /* [vocab, hidden] */
  const float *norm_w;              /* [hidden] */
  const uint16_t *lm_head;          /* fp16 [vocab, hidden] */
  const float *rope_cos, *rope_sin; /* [max_rope, D] */
  const LayerWeights *weights;      /* [layers] */
  int64_t *tokens;                  /* [B] in/out */
  int32_t *positions;               /* [B] in/out */
  int64_t *out;                     /* [B, steps] */
  float *x, *logits;                /* scratch [B, hidden], [B, vocab] */
  const double *expo;               /* [B, steps, vocab] exponentials, or NULL: all greedy */
  const float *temperature;         /* [B]; <= 0: a greedy row */
  const float *top_p_tail;          /* [B]; float32(1 - top_p): top-p drops the low tail of
                                       cumulative mass <= this; 0 = top-p off */
  const int32_t *top_k;             /* [B]; 0 = off */
  float *q_out;                     /* [B, steps, vocab] each sampled depth's distribution */
  float *scores;                    /* scratch [vocab] */
  int32_t *order;                   /* scratch [vocab] */
  float *logits_out;                /* [B, steps, vocab] each depth's logits, or NULL (a
                                       dynamic tree's leaves come from them) */
} Chain;

/* Per-depth inputs: embeddings, rope rows and the attention metadata of B causal rows. */
static void depth_inputs(const Chain *c, Forward *f) {
  int D = f->D, hidden = f->hidden, max_pos = 0;
  float *cos = (float *)f->cos, *sin = (float *)f->sin;
  int64_t *slots = (int64_t *)f->slots, *seq_idx = (int64_t *)f->q_seq_idx;
  int32_t *prefix = (int32_t *)f->q_prefix_lens, *starts = (int32_t *)f->tree_starts;
  uint64_t *masks = (uint64_t *)f->tree_masks;
  for (int b = 0; b < c->B; b++) {
    int pos = c->positions[b];
    memcpy(c->x + (int64_t)b * hidden, c->embed + c->tokens[b] * hidden, sizeof(float) * hidden);
    memcpy(cos + (int64_t)b * D, c->rope_cos + (int64_t)pos * D, sizeof(float) * D);
    memcpy(sin + (int64_t)b * D, c->rope_sin + (int64_t)pos * D, sizeof(float) * D);
    int32_t block = f->block_tables[(int64_t)b * f->max_blocks + pos / f->block_size];
    slots[b] = (int64_t)block * f->block_size + pos % f->block_size;
    prefix[b] = starts[b] = pos + 1; /* sees itself and everything before; no tree */
    seq_idx[b] = b;
    for (int w = 0; w < MASK_WORDS; w++) masks[b * MASK_WORDS + w] = 0;
    if (pos + 1 > max_pos) max_pos = pos + 1;
  }
  f->max_visible = max_pos + 64 * MASK_WORDS;
  int64_t work = (int64_t)c->B * f->H * max_pos;
  f->attn_threads = work < (1 << 12) ? 1 : (c->B * f->H < f->threads ? c->B * f->H : f->threads);
}

static int64_t argmax(const float *v, int n) {
  int64_t best = 0;
  for (int i = 1; i < n; i++)
    if (v[i] > v[best]) best = i;
  return best;
}

/* Ascending by score; ties by index (the sort only decides which tied scores the top-p cut
 * drops, a measure-zero difference from torch's unstable sort). */
static const float *sort_scores;
static int by_score(const void *a, const void *b) {
  float x = sort_scores[*(const int32_t *)a], y = sort_scores[*(const int32_t *)b];
  if (x != y) return x < y ? -1 : 1;
  return *(const int32_t *)a - *(const int32_t *)b;
}

/* q[v] = softmax(s)[v], -inf scores get 0. */
static void softmax(const float *s, float *q, int n) {
  float mx = -INFINITY;
  for (int i = 0; i < n; i++) mx = s[i] > mx ? s[i] : mx;
  double sum = 0.0;
  for (int i = 0; i < n; i++) sum += (q[i] = expf(s[i] - mx));
  for (int i = 0; i < n; i++) q[i] = (float)(q[i] / sum);
}

/* logits [V] -> q [V] (the fp16-rounded, renormalised warped distribution); scratch s [V]. */
static void warp(const float *logits, int n, float temperature, float tail, int top_k,
                 float *s, float *q, int32_t *order) {
  for (int i = 0; i < n; i++) s[i] = logits[i] / temperature;
  if ((top_k > 0 && top_k < n) || tail > 0.0f) {
    for (int i = 0; i < n; i++) order[i] = i;
    sort_scores = s;
    qsort(order, n, sizeof(int32_t), by_score);
  }
  if (top_k > 0 && top_k < n) {
    float kth = s[order[n - top_k]];
    for (int i = 0; i < n; i++)
      if (s[i] < kth) s[i] = -INFINITY;
  }
  if (tail > 0.0f) {  /* drop the low tail holding <= 1 - top_p of the mass */
    float mx = s[order[n - 1]];
    double total = 0.0, cum = 0.0;
    for (int i = 0; i < n; i++) total += expf(s[i] - mx);
    for (int j = 0; j < n - 1; j++) {
      int v = order[j];
      cum += expf(s[v] - mx);
      if ((float)(cum / total) > tail) break;
      s[v] = -INFINITY;
    }
  }
  softmax(s, q, n);
  double sum = 0.0;
  for (int i = 0; i < n; i++) sum += (q[i] = _cvtsh_ss(_cvtss_sh(q[i], 0)));
  for (int i = 0; i < n; i++) q[i] = (float)(q[i] / sum);
}

/* The token with q > 0 that finishes first at expo / q. */
static int64_t race(const double *expo, const float *q, int n) {
  int64_t best = -1;
  double best_t = INFINITY;
  for (int i = 0; i < n; i++) {
    if (q[i] <= 0.0f) continue;
    double t = expo[i] / (double)q[i];
    if (best < 0 || t < best_t) best = i, best_t = t;
  }
  return best;
}

static int64_t next_token(const Chain *c, int b, int s) {
  const float *row = c->logits + (int64_t)b * c->vocab;
  if (c->expo == NULL || c->temperature[b] <= 0.0f) return argmax(row, c->vocab);
  int64_t at = ((int64_t)b * c->steps + s) * c->vocab;
  float *q = c->q_out + at;
  warp(row, c->vocab, c->temperature[b], c->top_p_tail[b], c->top_k[b], c->scores, q,
       c->order);
  return race(c->expo + at, q, c->vocab);
}

int specmesh_chain_f16(Chain *c, Forward *f, float *k_pool, float *v_pool) {
  for (int s = 0; s < c->steps; s++) {
    for (int b = 0; b < c->B; b++)
      if (c->positions[b] >= c->max_rope) return -2;
    depth_inputs(c, f);
    for (int l = 0; l < c->layers; l++)
      if (specmesh_layer_f16(c->x, c->weights + l, f, k_pool + l * c->layer_floats,
                             v_pool + l * c->layer_floats))
        return -1;
    specmesh_rms_norm(c->x, c->norm_w, f->xn, c->B, f->hidden, f->eps);
    specmesh_linear_f16(c->lm_head, f->xn, c->logits, c->B, c->vocab, f->hidden, f->threads,
                        c->lm_stream);
    for (int b = 0; b < c->B; b++) {
      if (c->logits_out != NULL)
        memcpy(c->logits_out + ((int64_t)b * c->steps + s) * c->vocab,
               c->logits + (int64_t)b * c->vocab, sizeof(float) * c->vocab);
      c->tokens[b] = next_token(c, b, s);
      c->out[(int64_t)b * c->steps + s] = c->tokens[b];
      c->positions[b] += 1;
    }
  }
  return 0;
}
