"""deploy/grafana/specmesh.json queries only metrics (and labels) our services export."""

from __future__ import annotations

import json
import re

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from specmesh.cache_service.stats import CacheStats, StatsCollector
from specmesh.wire.metrics import ServiceMetrics
from tests.conftest import REPO

DASHBOARD = REPO / "deploy" / "grafana" / "specmesh.json"


def exported() -> dict[str, set[str]]:
    """Sample name -> label names, from a model service's, the gateway's and the cache's
    metrics after one of each kind of observation."""
    metrics = ServiceMetrics("verify")
    metrics.observe_batch(4, 20, 0.01)
    metrics.observe_round(4, 3)
    metrics.observe_tokens(10, 0.5)
    metrics.set_kv_blocks(3, 5)
    metrics.set_queue_depth(1)
    metrics.observe_request("/specmesh.v1.VerifyService/VerifyBatch", "OK", 0.01)
    metrics.observe_request("/specmesh.v1.VerifyService/VerifyBatch", "NOT_FOUND", 0.01)
    cache = CollectorRegistry()
    cache.register(StatsCollector(CacheStats()))
    samples: dict[str, set[str]] = {}
    for registry in (metrics.registry, cache):
        for family in text_string_to_metric_families(generate_latest(registry).decode()):
            for s in family.samples:
                samples.setdefault(s.name, set()).update(s.labels)
    return samples


def test_every_queried_metric_and_label_exists():
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    have = exported()
    for expr in exprs:
        for name in re.findall(r"specmesh_[a-z_]+", expr):
            assert name in have, f"{name} (in {expr!r}) is not exported"
            by = re.findall(r"by \(([^)]*)\)", expr)
            used = {label.strip() for group in by for label in group.split(",")}
            used |= set(re.findall(r"\{(\w+)=", expr))
            assert used - {"le"} <= have[name] | {"le"}, (name, used - have[name])
