"""Plain data the client API takes and returns (no torch, no gRPC)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from specmesh.clients.priority import DEFAULT_PRIORITY, check_priority
from specmesh.errors import InvalidRequest
from specmesh.v1 import common_pb2
from specmesh.wire.tree_spec import TreeSpec

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "seed")


MAX_NEW_TOKENS_LIMIT = 4096  # one limit for the CLI, the client and the gateway
DEFAULT_TREE = TreeSpec("chain", chain_length=5)  # the default everywhere (CLI, gateway, client)
NGRAM_TREE = TreeSpec("ngram", node_budget=8)  # the default with model-free (n-gram) drafting


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    tree: TreeSpec = DEFAULT_TREE
    speculate: bool = True
    adaptive: bool | None = None  # size the tree each round from measured acceptance and costs;
    # None (auto): on for chains, except for seeded sampling (see adaptive_on)
    priority: str = DEFAULT_PRIORITY  # scheduling class: "interactive" or "batch"

    def __post_init__(self):
        self.validate()  # self-validating: an instance is a valid request

    def validate(self) -> None:
        """Raise InvalidRequest naming the field (the edges that build params from a proto
        prefix it with the proto's own path, e.g. `sampling.top_p`)."""
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
            raise InvalidRequest("max_new_tokens", f"{self.max_new_tokens} not in [1, "
                                 f"{MAX_NEW_TOKENS_LIMIT}]")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise InvalidRequest("temperature", f"{self.temperature} must be >= 0")
        if not 0 < self.top_p <= 1:
            raise InvalidRequest("top_p", f"{self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise InvalidRequest("top_k", f"{self.top_k} must be >= 0")
        self.tree.validate("tree")
        check_priority(self.priority)

    @property
    def adaptive_on(self) -> bool:
        """Whether this request's tree is sized each round (clients/adaptive.py), the tree
        given being the largest. Auto (None) turns it on for chains (the default tree): under
        load a fixed chain costs up to half the throughput of plain decoding, and adaptive
        drafts less there, down to nothing. Not for seeded sampling (the sampled path depends
        on the tree drafted: a timing-sized tree would make one seed give different, equally
        distributed, text from run to run, and its result uncacheable); not for other tree
        kinds: the policy learns the draft's cost from chain rounds only, so a dynamic or
        static tree would stay at its first guess (initial_k nodes) at any load, and n-gram
        acceptance comes in bursts (whole copied spans) that a running average misses (README
        "Model-free drafting": ngram:8+adaptive 0.94x against ngram:8 1.33x)."""
        if self.adaptive is not None:
            return self.adaptive
        return self.tree.kind == "chain" and (self.temperature == 0 or self.seed is None)

    @property
    def deterministic(self) -> bool:
        return self.temperature == 0 or self.seed is not None

    def sampling_proto(self) -> common_pb2.SamplingParams:
        msg = common_pb2.SamplingParams(temperature=self.temperature, top_p=self.top_p,
                                        top_k=self.top_k)
        if self.seed is not None:
            msg.seed = self.seed
        return msg


@dataclass
class GenerationStats:
    num_rounds: int = 0
    num_draft_tokens: int = 0  # tokens proposed by the draft
    num_accepted_tokens: int = 0  # of those, accepted by the target
    num_generated_tokens: int = 0
    time_to_first_token_s: float = 0.0
    total_time_s: float = 0.0
    queue_time_s: float = 0.0  # from submission to the first round that ran it
    accepted_per_round: list[int] = field(default_factory=list)
    cache_hit: bool = False  # replayed from the result cache

    @property
    def tokens_per_s(self) -> float:
        return self.num_generated_tokens / self.total_time_s if self.total_time_s > 0 else 0.0

    @property
    def mean_accepted_per_round(self) -> float:
        return self.num_accepted_tokens / self.num_rounds if self.num_rounds else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # generated ids only
    prompt_token_ids: list[int]
    finish_reason: str  # "length" | "eos" | "stop" | "cancelled"
    stats: GenerationStats
    tree: str = ""
    matched_stop: str = ""  # finish_reason "stop": the stop string that matched
    model: str = ""  # through a gateway: the name@version that served it
    adaptive: bool = False  # the tree was sized each round (at most `tree`)

    def to_json(self) -> dict:
        s = self.stats
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "finish_reason": self.finish_reason,
            "num_prompt_tokens": len(self.prompt_token_ids),
            "num_generated_tokens": len(self.token_ids),
            "num_rounds": s.num_rounds,
            "num_draft_tokens": s.num_draft_tokens,
            "num_accepted_tokens": s.num_accepted_tokens,
            "mean_accepted_per_round": round(s.mean_accepted_per_round, 4),
            "acceptance_rate": round(s.acceptance_rate, 4),
            "tokens_per_s": round(s.tokens_per_s, 3),
            "time_to_first_token_s": round(s.time_to_first_token_s, 4),
            "total_time_s": round(s.total_time_s, 4),
            "queue_time_s": round(s.queue_time_s, 4),
            "tree": self.tree,
            "adaptive": self.adaptive,
            "cache_hit": s.cache_hit,
        }
