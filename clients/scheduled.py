"""What the scheduler tracks per sequence, and the pure rules applied to it when a round
commits (cut at EOS / max_new_tokens, finish reason) or is planned (the services' deltas)."""

from __future__ import annotations

from dataclasses import dataclass, field

from specmesh.clients.plan import SequenceDelta, SequenceRequest
from specmesh.clients.priority import rank
from specmesh.wire.tree_spec import TreeSpec


@dataclass
class ScheduledSequence:
    """What the scheduler tracks per sequence."""

    request: SequenceRequest
    arrival: int  # admission order key (FIFO)
    token_ids: list[int] = field(default_factory=list)  # prompt + generated
    draft_cached: int = 0  # leading tokens whose KV the draft service holds
    target_cached: int = 0  # leading tokens whose KV the verify service holds
    num_rounds: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    finish_reason: str | None = None
    was_scheduled: bool = False  # a service may hold state for it
    last_round: int = -1  # the scheduler round that last planned it

    @property
    def priority(self) -> str:
        return self.request.priority

    @property
    def queue_key(self) -> tuple[int, int, str]:
        """Position in the waiting queue: class first, then arrival."""
        return rank(self.priority), self.arrival, self.seq_id

    @property
    def seq_id(self) -> str:
        return self.request.request_id

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - len(self.request.prompt_token_ids)

    @property
    def generated_token_ids(self) -> list[int]:
        return self.token_ids[len(self.request.prompt_token_ids):]

    @property
    def num_step_tokens(self) -> int:
        """Tokens the target must take in next round besides the draft."""
        return len(self.token_ids) - self.target_cached


def delta(seq: ScheduledSequence, spec: TreeSpec) -> SequenceDelta:
    return SequenceDelta(seq.seq_id, seq.draft_cached, tuple(seq.token_ids[seq.draft_cached:]),
                         seq.target_cached, tuple(seq.token_ids[seq.target_cached:]), spec,
                         seq.request.sampling)


def chain_matched(tree_tokens, tree_parents, tokens, num_accepted: int) -> int:
    """Accepted draft tokens along the tree's leading chain (nodes 0, 1, .. each the child of
    the one before): the draft fed that chain, so its KV holds them; a dynamic tree's leaf
    accepted off the chain ends the match there. `tokens`: the round's accepted tokens first."""
    n, accepted = 0, min(num_accepted, len(tokens), len(tree_tokens))
    while n < accepted and tree_parents[n] == n - 1 and tree_tokens[n] == tokens[n]:
        n += 1
    return n


def cut(seq: ScheduledSequence, tokens: list[int]) -> list[int]:
    """Keep tokens up to and including the first EOS, and no more than max_new_tokens."""
    req = seq.request
    tokens = tokens[: req.max_new_tokens - seq.num_generated]
    if req.eos_token_id is not None and not req.ignore_eos and req.eos_token_id in tokens:
        tokens = tokens[: tokens.index(req.eos_token_id) + 1]
    return tokens


def finish_reason(seq: ScheduledSequence, kept: list[int]) -> str | None:
    req = seq.request
    if kept and req.eos_token_id is not None and not req.ignore_eos \
            and kept[-1] == req.eos_token_id:
        return "eos"
    if seq.num_generated >= req.max_new_tokens:
        return "length"
    return None


def fit(wanted: list[int], room: int) -> list[int]:
    """Cut budgets to sum <= room: the largest level L with sum(min(w, L)) <= room, then the
    leftover one token each to the earliest that want more."""
    if sum(wanted) <= room:
        return wanted
    level = 0
    while sum(min(w, level + 1) for w in wanted) <= room:
        level += 1
    out = [min(w, level) for w in wanted]
    left = room - sum(out)
    for i, w in enumerate(wanted):
        if left == 0:
            break
        if w > level:
            out[i] += 1
            left -= 1
    return out
