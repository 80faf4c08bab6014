"""Prefix KV from the cache service, the torch side: seed a new sequence, export full chunks.

A model service that found the first chunks of a new prompt in the cache writes their KV into
the sequence with `seed_prefix` and prefills only the rest; after that prefill it reads the KV of
the prompt's new full chunks with `export_prefix` and stores them (the async side, in
`model_service.prefix_cache`). Chunks are numpy arrays `[num_layers, 2, chunk_size, Hkv, D]`
(see `kernels.kv_transfer`). Anything that does not fit the cache is ignored, never loaded:
the sequence is then prefilled from scratch, with the same result.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from specmesh.kernels.kv_transfer import export_chunks, import_chunks
from specmesh.model_service.sequences import SequenceStore, SyncedStep

log = logging.getLogger(__name__)


def num_prefix_tokens(chunks: Sequence[np.ndarray], num_new_tokens: int) -> int:
    """Positions `seed_prefix` can take from `chunks` for a step of `num_new_tokens`: all the
    chunks cover, but never the last token (it must run to give logits)."""
    cached = sum(c.shape[2] if c.ndim == 5 else 0 for c in chunks)
    return max(0, min(cached, num_new_tokens - 1))


def seed_prefix(store: SequenceStore, step: SyncedStep, chunks: Sequence[np.ndarray],
                keep: set[str]) -> SyncedStep:
    """Write cached prefix `chunks` into a freshly created sequence and drop them from the step.

    Only a step with nothing cached (`num_cached == 0`) takes a prefix. The last token of the
    step always stays to run (its logits are the reason for the forward), so a fully cached
    prompt of n tokens imports n - 1 positions. `keep`: sequences a full cache must not evict
    to make room (the rest of the batch). Returns the step left to run; on any mismatch
    (shape, dtype, no room) the step unchanged, after logging why.
    """
    if not chunks or step.num_cached != 0:
        return step
    try:
        kv = np.concatenate(chunks, axis=2)  # [L, 2, n, Hkv, D]
    except ValueError as exc:
        log.warning("%s: cached prefix chunks do not stack (%s); prefilling", step.seq_id, exc)
        return step
    num_valid = num_prefix_tokens(chunks, len(step.new_tokens))
    if num_valid <= 0:
        return step
    if store.reserve(step.seq_id, num_valid, keep | {step.seq_id}) is not None:
        return step  # no room for the prefix: the engine's own reserve reports it
    try:
        import_chunks(store.kv, step.seq_id, 0, kv[:, :, :num_valid])
    except ValueError as exc:
        log.warning("%s: cached prefix does not fit this model (%s); prefilling", step.seq_id,
                    exc)
        return step
    store.kv.set_num_tokens(step.seq_id, num_valid)
    store.commit(step.seq_id, step.new_tokens[:num_valid])
    return SyncedStep(step.seq_id, step.new_tokens[num_valid:], num_valid)


def export_prefix(store: SequenceStore, seq_id: str, token_ids: Sequence[int],
                  chunk_size: int, start_chunk: int, end_chunk: int) -> list[np.ndarray]:
    """KV of chunks [start_chunk, end_chunk) of `seq_id`, one array per chunk.

    Returns [] unless the sequence still holds `token_ids[:end_chunk * chunk_size]` committed
    (it may have been released, evicted or truncated since its prefill).
    """
    start, end = start_chunk * chunk_size, end_chunk * chunk_size
    if end <= start or seq_id not in store:
        return []
    held = store.tokens(seq_id)
    if len(held) < end or held[:end] != list(token_ids[:end]):
        return []
    kv = export_chunks(store.kv, seq_id, start, end)  # [L, 2, end - start, Hkv, D]
    return np.split(kv, end_chunk - start_chunk, axis=2)
