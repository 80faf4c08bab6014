"""SequenceEngine: what every model service's engine owns (model, paged KV, sequences)."""

from __future__ import annotations

import numpy as np

from kernels.loader import LoadedModel
from kernels.prefix_kv import export_prefix
from kernels.runner import ModelRunner
from kernels.sequences import SequenceStore


class SequenceEngine:
    """The loaded model, its KV cache (`kv_cache_mb` MiB), per-sequence token lists, a runner."""

    def __init__(self, loaded: LoadedModel, kv_cache_mb: float, block_size: int = 16,
                 idle_evict_s: float = 60.0):
        self.loaded = loaded
        self.sequences = SequenceStore.for_model(loaded, kv_cache_mb, block_size, idle_evict_s)
        self.kv = self.sequences.kv
        self.runner = ModelRunner(loaded, self.kv)

    def release(self, seq_ids: list[str]) -> int:
        return self.sequences.release(seq_ids)

    def export_prefix(self, seq_id: str, token_ids: list[int], chunk_size: int,
                      start_chunk: int, end_chunk: int) -> list[np.ndarray]:
        """KV chunks [start_chunk, end_chunk) of a sequence for the prefix cache (see
        `kernels.prefix_kv.export_prefix`)."""
        return export_prefix(self.sequences, seq_id, token_ids, chunk_size, start_chunk,
                             end_chunk)
