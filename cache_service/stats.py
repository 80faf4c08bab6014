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
    ngram_lookups: int = 0
    ngram_hits: int = 0
    ngrams_written: int = 0
    rejected_by_reason: Counter = field(default_factory=Counter)
    latency: dict[str, OpLatency] = field(default_factory=dict)

    def observe(self, op: str, seconds: float) -> None:
        self.latency.setdefault(op, OpLatency()).observe(seconds)

    def reject(self, reason: str) -> None:
        self.chunks_rejected += 1
        self.rejected_by_reason[reason] += 1


class StatsCollector(Collector):
    """Prometheus view of a CacheStats (register on a registry; read at scrape time). Every
    series carries `service` (="cache"), like the other services' metrics."""

    def __init__(self, stats: CacheStats, service: str = "cache"):
        self.stats = stats
        self.service = service

    def _family(self, cls, name: str, doc: str, label: str | None = None,
                values: dict[str, float] | None = None, value: float | None = None):
        fam = cls(name, doc, labels=["service"] + ([label] if label else []))
        if label:
            for key, n in values.items():
                fam.add_metric([self.service, key], n)
        else:
            fam.add_metric([self.service], value)
        return fam

    def collect(self):
        s, f = self.stats, self._family
        yield f(CounterMetricFamily, "specmesh_cache_hits", "Cache hits", "kind",
                {"prefix": s.prefix_hits, "result": s.result_hits})
        yield f(CounterMetricFamily, "specmesh_cache_misses", "Cache misses", "kind",
                {"prefix": s.prefix_misses, "result": s.result_misses})
        yield f(CounterMetricFamily, "specmesh_cache_prefix_tokens_hit",
                "Prompt tokens served from cached prefix chunks", value=s.prefix_tokens_hit)
        yield f(CounterMetricFamily, "specmesh_cache_chunks", "KV chunks by outcome", "outcome",
                {o: getattr(s, f"chunks_{o}") for o in ("read", "written", "skipped")})
        yield f(CounterMetricFamily, "specmesh_cache_chunks_rejected", "Stored chunks not loaded",
                "reason", dict(sorted(s.rejected_by_reason.items())))
        yield f(CounterMetricFamily, "specmesh_cache_bytes", "Value bytes moved", "direction",
                {"read": s.bytes_read, "written": s.bytes_written})
        yield f(CounterMetricFamily, "specmesh_cache_ngram_lookups", "Fleet n-gram contexts "
                "looked up, by outcome", "outcome",
                {"hit": s.ngram_hits, "miss": s.ngram_lookups - s.ngram_hits})
        yield f(CounterMetricFamily, "specmesh_cache_ngrams_written",
                "Fleet n-gram (context, continuation) pairs counted", value=s.ngrams_written)
        yield f(CounterMetricFamily, "specmesh_cache_errors", "Redis failures answered as misses",
                value=s.errors)
        yield self._latency()

    def _latency(self) -> HistogramMetricFamily:
        hist = HistogramMetricFamily("specmesh_cache_request_seconds",
                                     "Cache operation latency", labels=["service", "op"])
        for op, lat in sorted(self.stats.latency.items()):
            cumulative, buckets = 0, []
            for bound, n in zip((*map(str, LATENCY_BUCKETS_S), "+Inf"), lat.buckets):
                cumulative += n
                buckets.append((bound, cumulative))
            hist.add_metric([self.service, op], buckets, lat.total_s)
        return hist
