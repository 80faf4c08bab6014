"""SequenceEngine: what every model service's engine owns (model, paged KV, sequences)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from specmesh.errors import InvalidRequest
from specmesh.kernels.loader import LoadedModel
from specmesh.kernels.runner import ModelRunner
from specmesh.model_service.config import EngineConfig
from specmesh.model_service.prefix_kv import export_prefix, num_prefix_tokens
from specmesh.model_service.sequences import SequenceStore

T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SequenceItem:
    """The sequence header every model-service work item starts with (DESIGN.md §2)."""

    seq_id: str
    num_cached_tokens: int
    new_tokens: list[int]

    @property
    def num_fed(self) -> int:
        """New tokens the forward runs: those a cached prefix (`prefix_chunks`, where the item
        has them) supplies are not."""
        chunks = getattr(self, "prefix_chunks", ())
        return len(self.new_tokens) - num_prefix_tokens(chunks, len(self.new_tokens))


class SequenceEngine:
    """The loaded model, its KV cache (`config.kv_cache_mb` MiB), per-sequence token lists, a
    runner."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig = EngineConfig()):
        self.loaded = loaded
        self.config = config
        self.sequences = SequenceStore.for_model(loaded, config)
        self.kv = self.sequences.kv
        self.runner = ModelRunner(loaded, self.kv)
        if self.runner.graphs is not None:  # on a GPU: capture now, not during requests
            try:
                self.runner.graphs.capture_all()
            except Exception:  # noqa: BLE001 - eager forwards still serve
                log.exception("CUDA graph capture failed: running the model eagerly")
                self.runner.graphs = None

    def prepare_each(self, items: Sequence[SequenceItem],
                     prepare: Callable[[Any, set[str]], T]) -> tuple[list, list[tuple[int, T]]]:
        """`prepare(item, batch_ids)` for every item, each failure confined to its item (a
        second item for one sequence in a batch is refused). Returns (results, ready): results
        holds the failures by position (None elsewhere), ready the (position, prepared) pairs."""
        results: list = [None] * len(items)
        ready: list[tuple[int, T]] = []
        batch_ids = {it.seq_id for it in items}
        seen: set[str] = set()
        for i, item in enumerate(items):
            try:
                if item.seq_id in seen:
                    raise InvalidRequest("header.sequence_id", f"{item.seq_id!r} appears twice "
                                         "in one batch (one request per sequence at a time)")
                seen.add(item.seq_id)
                ready.append((i, prepare(item, batch_ids)))
            except Exception as exc:  # noqa: BLE001 - confined to this item
                results[i] = exc
        return results, ready

    def release(self, seq_ids: list[str]) -> int:
        return self.sequences.release(seq_ids)

    def export_prefix(self, seq_id: str, token_ids: list[int], chunk_size: int,
                      start_chunk: int, end_chunk: int) -> list[np.ndarray]:
        """KV chunks [start_chunk, end_chunk) of a sequence for the prefix cache (see
        `model_service.prefix_kv.export_prefix`)."""
        return export_prefix(self.sequences, seq_id, token_ids, chunk_size, start_chunk,
                             end_chunk)
