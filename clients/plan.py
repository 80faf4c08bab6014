"""The plan of one round: the contract between the scheduler and the code that calls the
services (`clients/batch_loop.py`, `clients/step.py`). Plain frozen data, no I/O.

A `StepPlan` names every sequence that runs this round with everything the round needs for it:
each service's SequenceHeader (new sequences their full token ids, running ones deltas against
what that service holds), this round's tree and its sampling; plus the ids whose state the
services may free. `CommitResult` is what committing one sequence's outcome gave.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from specmesh.clients.priority import DEFAULT_PRIORITY, check_priority
from specmesh.v1 import common_pb2
from specmesh.wire.tree_spec import TreeSpec


@dataclass(frozen=True)
class SequenceRequest:
    request_id: str  # also the sequence id the services see
    prompt_token_ids: tuple[int, ...]
    max_new_tokens: int
    eos_token_id: int | None = None  # None or ignore_eos: only max_new_tokens ends it here
    ignore_eos: bool = False
    max_spec_tokens: int = 8  # most draft tokens per round; 0 = never speculate
    tree: TreeSpec = TreeSpec()  # the shape each round's tree is scaled from (none = no draft)
    sampling: common_pb2.SamplingParams | None = None  # as the services take it; None = greedy
    priority: str = DEFAULT_PRIORITY  # "interactive" or "batch" (clients/priority.py)

    def __post_init__(self):
        object.__setattr__(self, "prompt_token_ids", tuple(self.prompt_token_ids))
        check_priority(self.priority)
        if not self.prompt_token_ids:
            raise ValueError("prompt_token_ids: empty prompt")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: {self.max_new_tokens} must be >= 1")
        if self.max_spec_tokens < 0:
            raise ValueError(f"max_spec_tokens: {self.max_spec_tokens} must be >= 0")


@dataclass(frozen=True)
class NewSequence:
    """A sequence admitted for the first time: full token ids, nothing cached anywhere."""

    seq_id: str
    token_ids: tuple[int, ...]
    spec: TreeSpec = field(default=TreeSpec(), compare=False)  # this round's tree
    sampling: common_pb2.SamplingParams | None = field(default=None, compare=False)


@dataclass(frozen=True)
class SequenceDelta:
    """Everything a round needs for one sequence: each service's SequenceHeader, this round's
    tree (the request's, scaled to the draft budget) and the sampling parameters."""

    seq_id: str
    draft_num_cached: int
    draft_new_tokens: tuple[int, ...]
    target_num_cached: int
    target_new_tokens: tuple[int, ...]
    spec: TreeSpec = field(default=TreeSpec(), compare=False)
    sampling: common_pb2.SamplingParams | None = field(default=None, compare=False)


@dataclass(frozen=True)
class StepPlan:
    new: tuple[NewSequence, ...]
    running: tuple[SequenceDelta, ...]
    finished_sequence_ids: tuple[str, ...]  # retired since the last plan: free their state
    spec_lengths: tuple[tuple[str, int], ...]  # (seq_id, draft budget in tokens), plan order
    num_batch_tokens: int  # step tokens + draft budgets of the whole plan

    @property
    def sequence_ids(self) -> tuple[str, ...]:
        return tuple(d.seq_id for d in self.deltas())

    @property
    def is_empty(self) -> bool:
        """No sequence runs (there may still be finished ids to release)."""
        return not self.new and not self.running

    def spec_length(self, seq_id: str) -> int:
        return dict(self.spec_lengths)[seq_id]

    def deltas(self) -> tuple[SequenceDelta, ...]:
        """Every planned sequence as a delta (new ones with num_cached 0), running first."""
        fresh = tuple(SequenceDelta(n.seq_id, 0, n.token_ids, 0, n.token_ids, n.spec, n.sampling)
                      for n in self.new)
        return self.running + fresh


@dataclass(frozen=True)
class CommitResult:
    appended: tuple[int, ...]  # the tokens kept (cut after EOS / at max_new_tokens)
    finish_reason: str | None  # "eos" | "length" | None (still running)
