"""N-gram drafting for a batch of sequences: each sequence's tokens so far, no model, no KV.

Requests carry the same sequence protocol as model drafting (`num_cached_tokens` + `new_tokens`),
so the client treats both alike. The store is bounded: at most `max_sequences` sequences (the
least recently used is dropped; its owner gets NOT_FOUND and resends its tokens, as after any
eviction) and `max_tokens` tokens per sequence.
"""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict
from collections.abc import Callable

import numpy as np

from specmesh.draft_service.engine import ProposeItem, ProposeResult
from specmesh.draft_service.ngram import NgramConfig, propose_tree
from specmesh.draft_service.ngram_fleet import FleetTable
from specmesh.errors import OWNER_SEP, InvalidRequest, UnknownSequence

MAX_TOKEN_ID = 1 << 30  # ids are checked by the verify service against its vocabulary


class TokenHistories:
    """seq_id -> int32 token array, least recently used first."""

    def __init__(self, max_sequences: int = 4096, max_tokens: int = 1 << 17,
                 clock: Callable[[], float] = time.monotonic):
        self.max_sequences, self.max_tokens = max_sequences, max_tokens
        self._clock = clock
        self._seqs: OrderedDict[str, np.ndarray] = OrderedDict()  # id -> [L] int32

    def __len__(self) -> int:
        return len(self._seqs)

    def sync(self, seq_id: str, num_cached: int, new_tokens: list[int]) -> np.ndarray:
        """Keep the first `num_cached` tokens, append `new_tokens`; the history [L] int32."""
        if not seq_id.rpartition(OWNER_SEP)[2]:
            raise InvalidRequest("header.sequence_id", "must not be empty")
        if num_cached < 0:
            raise InvalidRequest("header.num_cached_tokens", f"{num_cached} is negative")
        if any(not 0 <= t < MAX_TOKEN_ID for t in new_tokens):
            raise InvalidRequest("header.new_tokens", "token ids must be in [0, 2^30)")
        if num_cached == 0:
            if not new_tokens:
                raise InvalidRequest("header.new_tokens", "empty prompt")
            held = np.zeros(0, dtype=np.int32)
        else:
            held = self._seqs.get(seq_id)
            if held is None:
                raise UnknownSequence.for_id(seq_id)
            if num_cached > len(held):
                raise InvalidRequest("header.num_cached_tokens",
                                     f"{num_cached} exceeds the {len(held)} tokens held")
        tokens = np.concatenate([held[:num_cached], np.asarray(new_tokens, dtype=np.int32)])
        if len(tokens) > self.max_tokens:
            raise InvalidRequest("header.new_tokens", f"{len(tokens)} tokens; at most "
                                 f"{self.max_tokens} per sequence")
        self._seqs[seq_id] = tokens
        self._seqs.move_to_end(seq_id)
        while len(self._seqs) > self.max_sequences:
            self._seqs.popitem(last=False)
        return tokens

    def get(self, seq_id: str) -> np.ndarray | None:
        """The tokens held for `seq_id` [L] int32 (None if unknown)."""
        return self._seqs.get(seq_id)

    def release(self, seq_ids: list[str]) -> int:
        return sum(self._seqs.pop(s, None) is not None for s in seq_ids)


class NgramDrafter:
    """Proposes trees from each sequence's own tokens (`draft_service.ngram`): microseconds per
    item, run inline on the event loop (no batching, no worker thread). With a `fleet` table
    (`draft_service.ngram_fleet`) continuations seen in other requests join the local matches,
    and finished sequences are published to it."""

    def __init__(self, config: NgramConfig = NgramConfig(), histories: TokenHistories | None = None,
                 fleet: FleetTable | None = None):
        self.config = config
        self.histories = histories or TokenHistories()
        self.fleet = fleet

    async def prepare(self, item: ProposeItem) -> None:
        """Before a new sequence's first proposal: fetch its prompt's fleet contexts (bounded
        wait). Nothing to do without a fleet table or for a running sequence."""
        if self.fleet is not None and item.num_cached_tokens == 0 and item.new_tokens:
            await self.fleet.admit(item.new_tokens)

    def propose(self, item: ProposeItem) -> ProposeResult:
        history = self.histories.sync(item.seq_id, item.num_cached_tokens, item.new_tokens)
        config = self.config
        if item.spec.max_depth:
            config = dataclasses.replace(config, max_depth=item.spec.max_depth)
        extra = self.fleet.continuations(item.seq_id, history) if self.fleet else ()
        tokens, parents = propose_tree(history, item.spec.max_nodes, config,
                                       chain=item.spec.kind == "chain", extra=extra)
        # sampling: every node's children are fixed candidates (an empty draft distribution is
        # a point mass at each proposed token; kernels/sampling.py keeps that lossless)
        dists = [None] * (len(tokens) + 1) if tokens and not item.sampling.greedy else []
        return ProposeResult(tokens, parents, dists, len(history))

    def propose_batch(self, items: list[ProposeItem]) -> list[ProposeResult | Exception]:
        out: list[ProposeResult | Exception] = []
        for item in items:
            try:
                out.append(self.propose(item))
            except (InvalidRequest, UnknownSequence) as exc:
                out.append(exc)
        return out

    def release(self, seq_ids: list[str]) -> int:
        if self.fleet is not None:
            for seq_id in seq_ids:
                self.fleet.finish(seq_id, self.histories.get(seq_id))
        return self.histories.release(seq_ids)

    async def close(self) -> None:
        if self.fleet is not None:
            await self.fleet.close()
