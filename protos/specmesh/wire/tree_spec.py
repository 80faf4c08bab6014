"""TreeSpec: how much and in what shape the draft speculates, parsed once from text or proto.

    chain:4          a single path of 4 draft tokens
    static:4,2,2,1   top-4 children at depth 1, then 2, 2, 1 per node
    dynamic:16       EAGLE-2 style: the 16 best nodes by cumulative draft probability
    ngram:8          model-free: up to 8 nodes continuing earlier occurrences of the sequence's
                     last tokens (prompt lookup; needs no draft model)
    none             no speculation (plain target decoding)
"""

from __future__ import annotations

from dataclasses import dataclass

from specmesh.v1 import common_pb2
from specmesh.wire.errors import InvalidRequest

MAX_TREE_NODES = 128  # the tree-attention bitmask width
MAX_DEPTH = 32
DEFAULT_DYNAMIC_DEPTH = 6

_KINDS = {
    "chain": common_pb2.TreeSpec.KIND_CHAIN,
    "static": common_pb2.TreeSpec.KIND_STATIC,
    "dynamic": common_pb2.TreeSpec.KIND_DYNAMIC,
    "ngram": common_pb2.TreeSpec.KIND_NGRAM,
}
DEFAULT_NGRAM_DEPTH = 8


@dataclass(frozen=True)
class TreeSpec:
    kind: str = "none"  # "none" | "chain" | "static" | "dynamic" | "ngram"
    chain_length: int = 0
    branching: tuple[int, ...] = ()
    node_budget: int = 0
    max_depth: int = 0  # dynamic only; 0 = DEFAULT_DYNAMIC_DEPTH

    @property
    def enabled(self) -> bool:
        return self.kind != "none" and self.max_nodes > 0

    @property
    def max_nodes(self) -> int:
        if self.kind == "chain":
            return self.chain_length
        if self.kind == "static":
            total, width = 0, 1
            for b in self.branching:
                width *= b
                total += width
            return total
        if self.kind in ("dynamic", "ngram"):
            return self.node_budget
        return 0

    @property
    def model_free(self) -> bool:
        """Drafted without a draft model (n-gram lookup)."""
        return self.kind == "ngram"

    @property
    def depth(self) -> int:
        if self.kind == "chain":
            return self.chain_length
        if self.kind == "static":
            return len(self.branching)
        if self.kind == "dynamic":
            return min(self.max_depth or DEFAULT_DYNAMIC_DEPTH, self.node_budget)
        if self.kind == "ngram":
            return min(self.max_depth or DEFAULT_NGRAM_DEPTH, self.node_budget)
        return 0

    def __str__(self) -> str:
        if self.kind == "chain":
            return f"chain:{self.chain_length}"
        if self.kind == "static":
            return "static:" + ",".join(map(str, self.branching))
        if self.kind in ("dynamic", "ngram"):
            depth = f"/{self.max_depth}" if self.max_depth else ""  # parse() round-trips it
            return f"{self.kind}:{self.node_budget}{depth}"
        return "none"

    def validate(self, field: str = "tree_spec") -> "TreeSpec":
        """Raise InvalidRequest naming the field when the spec is absurd; return self."""
        if self.kind == "chain" and not 1 <= self.chain_length <= MAX_DEPTH:
            raise InvalidRequest(f"{field}.chain_length",
                                 f"{self.chain_length} not in [1, {MAX_DEPTH}]")
        if self.kind == "static":
            if not self.branching or len(self.branching) > MAX_DEPTH:
                raise InvalidRequest(f"{field}.branching", f"needs 1..{MAX_DEPTH} depths")
            if any(b <= 0 for b in self.branching):
                raise InvalidRequest(f"{field}.branching", "every branching factor must be >= 1")
        if self.kind in ("dynamic", "ngram"):
            if not 1 <= self.node_budget <= MAX_TREE_NODES:
                raise InvalidRequest(f"{field}.node_budget",
                                     f"{self.node_budget} not in [1, {MAX_TREE_NODES}]")
            if not 0 <= self.max_depth <= MAX_DEPTH:
                raise InvalidRequest(f"{field}.max_depth", f"{self.max_depth} not in [0, {MAX_DEPTH}]")
        if self.max_nodes > MAX_TREE_NODES:
            raise InvalidRequest(field, f"{self.max_nodes} nodes exceed {MAX_TREE_NODES}")
        return self

    @classmethod
    def parse(cls, text: str) -> "TreeSpec":
        """Parse 'chain:4', 'static:4,2,2,1', 'dynamic:16' or 'none' (ValueError if malformed)."""
        kind, _, arg = text.strip().partition(":")
        try:
            if kind == "none" or (kind == "chain" and arg.strip() == "0"):
                return cls()
            if kind == "chain":
                return cls("chain", chain_length=int(arg))
            if kind == "static":
                return cls("static", branching=tuple(int(x) for x in arg.split(",")))
            if kind in ("dynamic", "ngram"):
                budget, _, depth = arg.partition("/")
                return cls(kind, node_budget=int(budget), max_depth=int(depth or 0))
        except ValueError:
            pass
        raise ValueError(f"bad tree spec {text!r}: use chain:K, static:B1,B2,..., dynamic:N, "
                         "ngram:N or none")

    def to_proto(self) -> common_pb2.TreeSpec:
        if self.kind == "none":
            return common_pb2.TreeSpec()
        return common_pb2.TreeSpec(kind=_KINDS[self.kind], chain_length=self.chain_length,
                                   branching=list(self.branching), node_budget=self.node_budget,
                                   max_depth=self.max_depth)

    @classmethod
    def from_proto(cls, msg: common_pb2.TreeSpec, field: str = "tree_spec") -> "TreeSpec":
        names = {v: k for k, v in _KINDS.items()}
        if msg.kind == common_pb2.TreeSpec.KIND_UNSPECIFIED:
            return cls()
        if msg.kind not in names:
            raise InvalidRequest(f"{field}.kind", f"unknown kind {msg.kind}")
        spec = cls(names[msg.kind], chain_length=msg.chain_length,
                   branching=tuple(msg.branching), node_budget=msg.node_budget,
                   max_depth=msg.max_depth)
        return spec.validate(field)

    def scaled(self, num_nodes: int) -> "TreeSpec":
        """The same kind of tree, shrunk to about `num_nodes` nodes (adaptive speculation)."""
        if num_nodes <= 0:
            return TreeSpec()
        if self.kind == "chain":
            return TreeSpec("chain", chain_length=min(self.chain_length, num_nodes))
        if self.kind in ("dynamic", "ngram"):
            return TreeSpec(self.kind, node_budget=min(self.node_budget, num_nodes),
                            max_depth=self.max_depth)
        if self.kind == "static":
            out, total, width = [], 0, 1
            for b in self.branching:
                if total + width * b > num_nodes:
                    b = max(1, (num_nodes - total) // width)
                    if total + width * b > num_nodes:
                        break
                out.append(b)
                width *= b
                total += width
            return TreeSpec("static", branching=tuple(out)) if out else TreeSpec()
        return self
