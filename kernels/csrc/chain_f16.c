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
 */
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
      c->tokens[b] = argmax(c->logits + (int64_t)b * c->vocab, c->vocab);
      c->out[(int64_t)b * c->steps + s] = c->tokens[b];
      c->positions[b] += 1;
    }
  }
  return 0;
}
