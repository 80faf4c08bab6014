"""What the client knows about one generation: its tokens and how much each service caches."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from specmesh.v1 import common_pb2


@dataclass
class SequenceState:
    prompt_ids: list[int]
    seq_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    tokens: list[int] = field(default_factory=list)  # prompt + generated
    draft_cached: int = 0  # leading tokens whose KV the draft service holds
    target_cached: int = 0  # leading tokens whose KV the verify service holds

    def __post_init__(self):
        if not self.tokens:
            self.tokens = list(self.prompt_ids)

    @property
    def generated(self) -> list[int]:
        return self.tokens[len(self.prompt_ids):]

    def header(self, cached: int) -> common_pb2.SequenceHeader:
        return common_pb2.SequenceHeader(sequence_id=self.seq_id, num_cached_tokens=cached,
                                         new_tokens=self.tokens[cached:])

    def draft_header(self) -> common_pb2.SequenceHeader:
        return self.header(self.draft_cached)

    def target_header(self) -> common_pb2.SequenceHeader:
        return self.header(self.target_cached)
