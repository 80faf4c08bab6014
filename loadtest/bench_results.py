"""Benchmark data: one sample per request, one row per (mode, concurrency), ratios, output checks.

Pure data and arithmetic (no I/O, no models), so the harness's bookkeeping is tested alone.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

# The four kinds of run the bench compares; `tree` tells speculative configs apart.
TARGET = "target-only"
SPEC = "spec"
HF_TARGET = "hf target-only"
HF_ASSISTED = "hf assisted"


@dataclass(frozen=True)
class RequestSample:
    """What one request produced and how long it took (seconds, from its own start)."""

    prompt_index: int
    token_ids: list[int]
    latency_s: float
    ttft_s: float
    num_rounds: int  # target forwards the request went through (HF: streamer chunks)
    num_accepted: int  # draft tokens the target accepted, summed over rounds


@dataclass(frozen=True)
class BenchRow:
    """Aggregate of one mode at one concurrency."""

    system: str  # "specmesh" | "hf"
    kind: str  # TARGET | SPEC | HF_TARGET | HF_ASSISTED
    tree: str  # "chain:4", "dynamic:16+adaptive", ... ("" without a draft)
    concurrency: int
    num_requests: int
    num_tokens: int  # generated tokens, all requests
    wall_s: float  # first request start to last request end
    tokens_per_s: float  # aggregate: num_tokens / wall_s
    latency_p50_s: float
    latency_p95_s: float
    ttft_p50_s: float
    mean_accepted_per_round: float | None  # None without a draft
    tokens_per_round: float  # accepted + bonus, i.e. tokens per target forward

    @property
    def mode(self) -> str:
        if self.kind == SPEC:
            return f"specmesh spec {self.tree}"
        if self.kind == HF_ASSISTED:
            return HF_ASSISTED
        return f"specmesh {TARGET}" if self.system == "specmesh" else HF_TARGET

    @property
    def label(self) -> str:
        return f"{self.mode} @ c={self.concurrency}"

    def to_json(self) -> dict:
        return {"mode": self.mode, **asdict(self)}


@dataclass
class ModeRun:
    """One mode at one concurrency: its row and the requests behind it."""

    row: BenchRow
    samples: list[RequestSample]


@dataclass(frozen=True)
class Ratio:
    name: str
    value: float
    numerator: str  # row label
    denominator: str  # row label

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class OutputCheck:
    """Token-for-token comparisons; every count must be zero."""

    counts: dict[str, int] = field(default_factory=dict)
    details: list[str] = field(default_factory=list)
    # HF differences reported, not counted: bf16/fp16 runs, where HF's kernels and ours round
    # differently and greedy decoding may part at a near tie
    uncounted: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_json(self) -> dict:
        return {"total": self.total, **self.counts, "details": self.details,
                "hf_uncounted": self.uncounted}


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of a non-empty list."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarise(system: str, kind: str, tree: str, concurrency: int,
              samples: list[RequestSample], wall_s: float) -> ModeRun:
    """Aggregate requests; wall_s is the time they took together (summed over repeats)."""
    num_tokens = sum(len(s.token_ids) for s in samples)
    num_rounds = sum(s.num_rounds for s in samples)
    latencies = [s.latency_s for s in samples]
    row = BenchRow(
        system=system, kind=kind, tree=tree, concurrency=concurrency,
        num_requests=len(samples), num_tokens=num_tokens, wall_s=wall_s,
        tokens_per_s=num_tokens / wall_s if wall_s > 0 else 0.0,
        latency_p50_s=percentile(latencies, 50), latency_p95_s=percentile(latencies, 95),
        ttft_p50_s=percentile([s.ttft_s for s in samples], 50),
        mean_accepted_per_round=(sum(s.num_accepted for s in samples) / num_rounds
                                 if kind in (SPEC, HF_ASSISTED) and num_rounds else None),
        tokens_per_round=num_tokens / num_rounds if num_rounds else 0.0)
    return ModeRun(row, samples)


def _find(rows: list[BenchRow], kind: str, concurrency: int, tree: str = "") -> BenchRow | None:
    for r in rows:
        if r.kind == kind and r.concurrency == concurrency and (kind != SPEC or r.tree == tree):
            return r
    return None


def _ratio(name: str, num: BenchRow | None, den: BenchRow | None) -> Ratio | None:
    if num is None or den is None or den.tokens_per_s <= 0:
        return None
    return Ratio(name, num.tokens_per_s / den.tokens_per_s, num.label, den.label)


def compute_ratios(rows: list[BenchRow], trees: list[str]) -> list[Ratio]:
    """Throughput ratios: speculation gain, batching gain, and us vs HF transformers."""
    concs = sorted({r.concurrency for r in rows if r.system == "specmesh"})
    if not concs:
        return []
    lo, hi = concs[0], concs[-1]
    wanted = []
    for tree in trees:
        wanted.append((f"spec/target c={lo} [{tree}]",
                       _find(rows, SPEC, lo, tree), _find(rows, TARGET, lo)))
    if hi != lo:
        wanted.append((f"target-only c={hi}/c={lo}", _find(rows, TARGET, hi), _find(rows, TARGET, lo)))
        for tree in trees:
            wanted.append((f"spec c={hi}/c={lo} [{tree}]",
                           _find(rows, SPEC, hi, tree), _find(rows, SPEC, lo, tree)))
            wanted.append((f"spec/target c={hi} [{tree}]",
                           _find(rows, SPEC, hi, tree), _find(rows, TARGET, hi)))
    for tree in trees:
        wanted.append((f"ours spec [{tree}] / hf assisted c=1",
                       _find(rows, SPEC, 1, tree), _find(rows, HF_ASSISTED, 1)))
    best = max((r for r in rows if r.system == "specmesh" and r.kind == SPEC
                and r.concurrency == 1), key=lambda r: r.tokens_per_s, default=None)
    if best is not None:  # the issue-9 targets, named: best mode vs ours and vs HF
        wanted.append((f"best spec/target c=1 [{best.tree}]", best, _find(rows, TARGET, 1)))
        wanted.append((f"best spec / hf assisted c=1 [{best.tree}]", best,
                       _find(rows, HF_ASSISTED, 1)))
    wanted.append(_best_dynamic_vs_chain(rows, lo))
    wanted.append(("ours target-only / hf target-only c=1",
                   _find(rows, TARGET, 1), _find(rows, HF_TARGET, 1)))
    wanted.append(("hf assisted / hf target-only c=1",
                   _find(rows, HF_ASSISTED, 1), _find(rows, HF_TARGET, 1)))
    return [r for r in (_ratio(*w) for w in wanted) if r is not None]


def _best_dynamic_vs_chain(rows: list[BenchRow], conc: int) -> tuple:
    """(name, best dynamic tree, best fixed chain) at `conc` (issue 9: a dynamic tree at least
    as fast as the best chain); rows None where either is missing."""
    def best(kind: str) -> BenchRow | None:
        return max((r for r in rows if r.system == "specmesh" and r.kind == SPEC
                    and r.concurrency == conc and r.tree.split(":")[0] == kind
                    and "+" not in r.tree), key=lambda r: r.tokens_per_s, default=None)
    dyn, chain = best("dynamic"), best("chain")
    name = (f"best dynamic / best chain c={conc} [{dyn.tree} / {chain.tree}]"
            if dyn and chain else "")
    return name, dyn, chain


def check_outputs(runs: list[ModeRun], max_new_tokens: int, exact: bool = True,
                  hf_exact: bool = True) -> OutputCheck:
    """Compare every run's ids with our target-only ids for the same prompt.

    Categories: `short` (a request did not make exactly max_new_tokens), `batching` (target-only
    differs across concurrencies), `spec_vs_target`, `hf_vs_ours` (HF target-only vs ours) and
    `hf_assisted_vs_ours`. `hf_exact` False (a bf16/fp16 run): HF differences are listed in
    `uncounted`, not counted; ours must still agree exactly.
    """
    check = OutputCheck({"short": 0, "batching": 0, "spec_vs_target": 0, "hf_vs_ours": 0,
                         "hf_assisted_vs_ours": 0})
    reference: dict[int, tuple[str, list[int]]] = {}
    for run in runs:
        if run.row.kind == TARGET:
            for s in run.samples:
                reference.setdefault(s.prompt_index, (run.row.label, s.token_ids))
    category = {TARGET: "batching", SPEC: "spec_vs_target", HF_TARGET: "hf_vs_ours",
                HF_ASSISTED: "hf_assisted_vs_ours"}
    for run in runs:
        for i, ids in ((s.prompt_index, s.token_ids) for s in run.samples):
            if len(ids) != max_new_tokens:
                check.counts["short"] += 1
                check.details.append(f"{run.row.label} prompt {i}: {len(ids)} tokens, "
                                     f"expected {max_new_tokens}")
            ref_label, ref = reference.get(i, ("", None))
            if not exact or ref is None or ids == ref:  # sampled: only the lengths must hold
                continue
            pos = next((k for k, (a, b) in enumerate(zip(ids, ref)) if a != b),
                       min(len(ids), len(ref)))
            detail = (f"{run.row.label} prompt {i} differs from {ref_label} at token {pos}: "
                      f"{ids[pos:pos + 4]} vs {ref[pos:pos + 4]}")
            if not hf_exact and run.row.kind in (HF_TARGET, HF_ASSISTED):
                check.uncounted.append(detail)
                continue
            check.counts[category[run.row.kind]] += 1
            check.details.append(detail)
    return check
