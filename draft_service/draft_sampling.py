"""The draft's side of sampling, in numpy: its distribution and its draws, per depth.

A sampled chain draws one token per depth from a single row of the draft's logits, and the
torch ops that warp that row cost ~10 us each (~0.3 ms a depth, ~1 ms a round, on two cores),
where the same work in numpy costs a few microseconds an op. The numbers follow
`kernels.sampling.warp_logits_to_probs` (HF's temperature, top-k and top-p warpers, then a
softmax) in float32, up to the last bits of the sums; the draft is free to differ there, since
it sends the distribution it drew from (fp16-rounded and renormalised, as the verifier decodes
it) and the verifier's rejection sampling uses exactly that. The draws are those of
`kernels.sampling.sample_without_replacement`: the same exponentials from the same generator,
the same race, so a seeded request draws the same tokens as that function would.
"""

from __future__ import annotations

import numpy as np
import torch

from specmesh.kernels.sampling import SamplingConfig


def _softmax(x: np.ndarray) -> np.ndarray:  # [N, V] float32, -inf allowed (not a whole row)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def warp(logits: np.ndarray, cfg: SamplingConfig) -> np.ndarray:
    """[N, V] logits -> [N, V] float32 probabilities: temperature, top-k, top-p, softmax
    (sampling only: `cfg` not greedy)."""
    scores = logits.astype(np.float32)
    if cfg.temperature != 1.0:
        scores = scores / np.float32(cfg.temperature)
    if cfg.top_k > 0:
        k = min(cfg.top_k, scores.shape[-1])
        kth = -np.partition(-scores, k - 1, axis=-1)[:, k - 1:k]  # [N, 1] k-th largest
        scores = np.where(scores < kth, -np.inf, scores).astype(np.float32)
    if cfg.top_p < 1.0:
        order = np.argsort(scores, axis=-1, kind="stable")  # [N, V] ascending
        sorted_scores = np.take_along_axis(scores, order, axis=-1)
        cumulative = np.cumsum(_softmax(sorted_scores), axis=-1)  # [N, V]
        remove_sorted = cumulative <= np.float32(1 - cfg.top_p)  # the low tail
        remove_sorted[:, -1] = False  # always keep the most likely token
        remove = np.empty_like(remove_sorted)
        np.put_along_axis(remove, order, remove_sorted, axis=-1)
        scores = np.where(remove, -np.inf, scores).astype(np.float32)
    return _softmax(scores).astype(np.float32)


def draft_probs(logits: np.ndarray, cfg: SamplingConfig) -> np.ndarray:
    """[N, V] logits -> [N, V] the distribution the draft draws from and sends: warped, rounded
    to fp16 (as on the wire) and renormalised."""
    q = warp(logits, cfg).astype(np.float16).astype(np.float32)
    return q / q.sum(axis=-1, keepdims=True)


def race(q: np.ndarray, k: int, generator: torch.Generator) -> np.ndarray:
    """[V] probabilities -> up to k distinct tokens in draw order (sequential draws without
    replacement), from one exponential per token: the first k to finish at E_v / q_v."""
    e = torch.empty(q.shape[0], dtype=torch.float64,
                    device=generator.device).exponential_(generator=generator).cpu().numpy()
    return finishers(e, q, k)


def finishers(e: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """The first k tokens (q > 0 only) to finish the race at e_v / q_v, in order; e [V] the
    exponentials, q [V] the probabilities."""
    num = min(k, int(np.count_nonzero(q > 0)))
    with np.errstate(divide="ignore"):
        finish = e.astype(np.float64) / q.astype(np.float64)  # [V], inf where q == 0
    if num == 1:
        return np.array([int(np.argmin(finish))], dtype=np.int64)
    first = np.argpartition(finish, num - 1)[:num]
    return first[np.argsort(finish[first], kind="stable")].astype(np.int64)
