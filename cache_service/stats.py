"""Cache counters and latencies: kept once here, read by the Stats RPC and by Prometheus."""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass
class OpLatency:
    """Latency of one operation: count, sum, max and histogram buckets (seconds)."""

    count: int = 0
    total_s: float = 0.0
    max_s: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))

    def observe(self, seconds: float) -> None:
        self.count += 1
        self.total_s += seconds
        self.max_s = max(self.max_s, seconds)
        self.buckets[bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += 1


@dataclass
class CacheStats:
    """Everything counted since start. See StatsResponse in cache.proto for each field."""

    prefix_hits: int = 0
    prefix_misses: int = 0
    prefix_tokens_hit: int = 0
    chunks_read: int = 0
    chunks_written: int = 0
    chunks_rejected: int = 0
    chunks_skipped: int = 0
    result_hits: int = 0
    result_misses: int = 0
    results_written: int = 0
    results_skipped: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    errors: int = 0
    rejected_by_reason: Counter = field(default_factory=Counter)
    latency: dict[str, OpLatency] = field(default_factory=dict)

    def observe(self, op: str, seconds: float) -> None:
        self.latency.setdefault(op, OpLatency()).observe(seconds)

    def reject(self, reason: str) -> None:
        self.chunks_rejected += 1
        self.rejected_by_reason[reason] += 1


class StatsCollector(Collector):
    """Prometheus view of a CacheStats (register on a registry; read at scrape time)."""

    def __init__(self, stats: CacheStats):
        self.stats = stats

    def collect(self):
        s = self.stats
        hits = CounterMetricFamily("specmesh_cache_hits", "Cache hits", labels=["kind"])
        hits.add_metric(["prefix"], s.prefix_hits)
        hits.add_metric(["result"], s.result_hits)
        misses = CounterMetricFamily("specmesh_cache_misses", "Cache misses", labels=["kind"])
        misses.add_metric(["prefix"], s.prefix_misses)
        misses.add_metric(["result"], s.result_misses)
        yield hits
        yield misses
        yield CounterMetricFamily("specmesh_cache_prefix_tokens_hit",
                                  "Prompt tokens served from cached prefix chunks",
                                  value=s.prefix_tokens_hit)
        chunks = CounterMetricFamily("specmesh_cache_chunks", "KV chunks by outcome",
                                     labels=["outcome"])
        for outcome in ("read", "written", "skipped"):
            chunks.add_metric([outcome], getattr(s, f"chunks_{outcome}"))
        yield chunks
        rejected = CounterMetricFamily("specmesh_cache_chunks_rejected",
                                       "Stored chunks not loaded", labels=["reason"])
        for reason, n in sorted(s.rejected_by_reason.items()):
            rejected.add_metric([reason], n)
        yield rejected
        io = CounterMetricFamily("specmesh_cache_bytes", "Value bytes moved", labels=["direction"])
        io.add_metric(["read"], s.bytes_read)
        io.add_metric(["written"], s.bytes_written)
        yield io
        yield CounterMetricFamily("specmesh_cache_errors", "Redis failures answered as misses",
                                  value=s.errors)
        yield self._latency()

    def _latency(self) -> HistogramMetricFamily:
        hist = HistogramMetricFamily("specmesh_cache_request_seconds",
                                     "Cache operation latency", labels=["op"])
        for op, lat in sorted(self.stats.latency.items()):
            cumulative, buckets = 0, []
            for bound, n in zip((*map(str, LATENCY_BUCKETS_S), "+Inf"), lat.buckets):
                cumulative += n
                buckets.append((bound, cumulative))
            hist.add_metric([op], buckets, lat.total_s)
        return hist
