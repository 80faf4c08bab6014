"""A draft's sampled draw, batched over rows, in torch ops a CUDA graph can hold.

The device twin of `draft_service.draft_sampling` (and of the sampled rows of
`kernels/csrc/chain_f16.c`): each row's logits are warped as `kernels.sampling` warps them
(temperature, top-k, top-p, softmax; per-row settings), rounded to fp16 and renormalised (what
the verifier decodes), and the token is the first to finish in the exponential race of
`sample_without_replacement` with k = 1, from exponentials drawn beforehand on the CPU with
each request's generator. Greedy rows take the argmax. No host syncs, no data-dependent shapes.
"""

from __future__ import annotations

import torch


def sample_rows(
    logits: torch.Tensor,  # [B, V] float32
    expo: torch.Tensor,  # [B, V] float64 exponentials (any value on greedy rows)
    temperature: torch.Tensor,  # [B] float32; <= 0: a greedy row
    tail: torch.Tensor,  # [B] float32: top-p drops the low tail of mass <= this; 0 = off
    top_k: torch.Tensor,  # [B] int64; 0 = off
) -> tuple[torch.Tensor, torch.Tensor]:  # tokens [B] int64, q [B, V] float32 (0 when greedy)
    vocab = logits.shape[-1]
    greedy = temperature <= 0  # [B]
    scores = logits / torch.where(greedy, torch.ones_like(temperature), temperature)[:, None]
    descending = scores.sort(dim=-1, descending=True).values  # [B, V]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))  # [B]
    kth = descending.gather(1, (k - 1)[:, None])  # [B, 1]: the k-th largest (off: the least)
    scores = scores.masked_fill(scores < kth, float("-inf"))
    ascending, order = scores.sort(dim=-1)  # [B, V] each
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)  # [B, V]
    remove = cumulative <= tail[:, None]  # the low tail holding <= 1 - top_p
    remove[:, -1] = False  # always keep the most likely token
    remove = torch.zeros_like(remove).scatter(1, order, remove)  # [B, V] back in vocab order
    q = scores.masked_fill(remove, float("-inf")).softmax(dim=-1).half().float()  # [B, V]
    q = q / q.sum(dim=-1, keepdim=True)
    finish = expo / q.double()  # [B, V], inf where q == 0
    tokens = torch.where(greedy, logits.argmax(dim=-1), finish.argmin(dim=-1))  # [B]
    return tokens, torch.where(greedy[:, None], torch.zeros_like(q), q)
