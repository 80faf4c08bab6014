"""Per-sequence state a model service keeps: token ids whose KV is cached, over a PagedKVCache.

`sync()` applies the request header of DESIGN.md §2: keep the first `num_cached_tokens`
positions, append `new_tokens`. It never runs the model; it only checks and truncates.
"""

from __future__ import annotations

from dataclasses import dataclass

from specmesh.errors import OWNER_SEP, InvalidRequest, UnknownSequence
from specmesh.kernels.kv_cache import NoRoom, PagedKVCache
from specmesh.kernels.loader import LoadedModel
from specmesh.model_service.config import EngineConfig


@dataclass
class SyncedStep:
    """What a forward must feed for one sequence after `sync`."""

    seq_id: str
    new_tokens: list[int]  # causal tokens to run (never empty)
    num_cached: int  # committed positions kept


class SequenceStore:
    """Token ids per sequence, kept in step with the KV cache's committed positions."""

    def __init__(self, kv: PagedKVCache, vocab_size: int, max_context: int,
                 idle_evict_s: float):
        self.kv = kv
        self.vocab_size = vocab_size
        self.max_context = max_context
        self.idle_evict_s = idle_evict_s
        self._tokens: dict[str, list[int]] = {}

    @classmethod
    def for_model(cls, loaded: LoadedModel, config: EngineConfig) -> "SequenceStore":
        """A store over a fresh KV cache of `config.kv_cache_mb` MiB shaped for `loaded`."""
        cfg = loaded.config
        num_blocks = PagedKVCache.blocks_for_mb(config.kv_cache_mb, cfg.num_layers,
                                                cfg.num_kv_heads, cfg.head_dim,
                                                config.block_size, loaded.dtype)
        kv = PagedKVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, config.block_size,
                          num_blocks, loaded.dtype, loaded.device)
        return cls(kv, cfg.vocab_size, cfg.max_position_embeddings, config.idle_evict_s)

    def reserve(self, seq_id: str, num_positions: int, keep: set[str]) -> NoRoom | None:
        """Reserve KV for positions [0, num_positions); when full, evict sequences idle for
        longer than `idle_evict_s` (never those in `keep`) and try once more."""
        blocks = -(-num_positions // self.kv.block_size)
        if blocks > self.kv.num_blocks:
            raise InvalidRequest("header.new_tokens",
                                 f"the sequence needs {blocks} KV blocks but the whole cache "
                                 f"holds {self.kv.num_blocks} (raise --kv-cache-mb)")
        if self.kv.reserve(seq_id, num_positions) is None:
            return None
        self.forget_evicted(self.kv.evict_idle(self.idle_evict_s, keep=keep))
        return self.kv.reserve(seq_id, num_positions)

    def __contains__(self, seq_id: str) -> bool:
        return seq_id in self._tokens and seq_id in self.kv

    def tokens(self, seq_id: str) -> list[int]:
        """Tokens whose KV is committed (a copy)."""
        return list(self._tokens[seq_id])

    def check_tokens(self, tokens: list[int], field: str) -> None:
        for i, t in enumerate(tokens):
            if not 0 <= t < self.vocab_size:
                raise InvalidRequest(f"{field}[{i}]",
                                     f"token id {t} outside [0, {self.vocab_size})")

    def sync(self, seq_id: str, num_cached: int, new_tokens: list[int],
             field_prefix: str = "header") -> SyncedStep:
        """Truncate to `num_cached` and return the causal tokens to run (validated)."""
        if not seq_id.rpartition(OWNER_SEP)[2]:  # the caller's id (services scope it: owner)
            raise InvalidRequest(f"{field_prefix}.sequence_id", "must not be empty")
        if num_cached < 0:
            raise InvalidRequest(f"{field_prefix}.num_cached_tokens", f"{num_cached} is negative")
        self.check_tokens(new_tokens, f"{field_prefix}.new_tokens")
        if num_cached == 0:
            if not new_tokens:
                raise InvalidRequest(f"{field_prefix}.new_tokens", "empty prompt")
            self.kv.create(seq_id)
            self._tokens[seq_id] = []
        else:
            if seq_id not in self:
                raise UnknownSequence.for_id(seq_id, f"{field_prefix}.sequence_id")
            held = len(self._tokens[seq_id])
            if num_cached > held:
                raise InvalidRequest(f"{field_prefix}.num_cached_tokens",
                                     f"{num_cached} exceeds the {held} tokens held for {seq_id}")
            if not new_tokens:  # re-run the last token to get its logits again
                new_tokens = self._tokens[seq_id][num_cached - 1:num_cached]
                num_cached -= 1
            self.kv.truncate(seq_id, num_cached)
            del self._tokens[seq_id][num_cached:]
        if num_cached + len(new_tokens) > self.max_context:
            raise InvalidRequest(f"{field_prefix}.new_tokens",
                                 f"sequence of {num_cached + len(new_tokens)} tokens exceeds the "
                                 f"context of {self.max_context}")
        return SyncedStep(seq_id, list(new_tokens), num_cached)

    def commit(self, seq_id: str, tokens: list[int]) -> None:
        """Record tokens whose KV now sits in the committed positions."""
        self._tokens[seq_id].extend(tokens)
        if len(self._tokens[seq_id]) != self.kv.num_tokens(seq_id):
            raise RuntimeError(f"{seq_id}: {len(self._tokens[seq_id])} tokens but "
                               f"{self.kv.num_tokens(seq_id)} KV positions")

    def release(self, seq_ids) -> int:
        n = 0
        for s in seq_ids:
            self._tokens.pop(s, None)
            n += int(self.kv.free(s))
        return n

    def forget_evicted(self, seq_ids: list[str]) -> None:
        for s in seq_ids:
            self._tokens.pop(s, None)
