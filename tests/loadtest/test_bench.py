"""`python -m specmesh.loadtest.bench`: the pure bookkeeping, then one small real run on the tiny pair."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest

from specmesh.loadtest.bench import parse_specs
from specmesh.loadtest.bench_report import format_report, format_table
from specmesh.loadtest.bench_results import (
    HF_ASSISTED,
    HF_TARGET,
    SPEC,
    TARGET,
    RequestSample,
    check_outputs,
    compute_ratios,
    percentile,
    summarise,
)
from tests.conftest import REPO, TINY_DRAFT, TINY_TARGET


def test_parse_specs_keeps_static_branching_together():
    specs = parse_specs("chain:4,static:4,2,2,1,dynamic:16+adaptive")
    assert [s.name for s in specs] == ["chain:4", "static:4,2,2,1", "dynamic:16+adaptive"]
    assert [s.adaptive for s in specs] == [False, False, True]
    assert parse_specs("static:2,2+adaptive")[0].name == "static:2,2+adaptive"


@pytest.mark.parametrize("bad", ["", "none", "chain:x", "chain:4+fast", "dynamic:999"])
def test_parse_specs_rejects(bad):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_specs(bad)


def test_percentile_interpolates():
    assert percentile([3.0], 95) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([0.0, 10.0], 95) == pytest.approx(9.5)


def _run(system, kind, tree, c, outputs, wall=1.0, rounds=4, accepted=0):
    samples = [RequestSample(i, ids, 0.5, 0.1, rounds, accepted) for i, ids in outputs.items()]
    return summarise(system, kind, tree, c, samples, wall)


def test_summarise_and_ratios():
    ids = {0: [5, 6, 7, 8], 1: [9, 9, 9, 9]}
    runs = [_run("specmesh", TARGET, "", 1, ids, wall=2.0),
            _run("specmesh", TARGET, "", 4, ids, wall=1.0),
            _run("specmesh", SPEC, "chain:4", 1, ids, wall=1.0, rounds=2, accepted=2),
            _run("specmesh", SPEC, "chain:4", 4, ids, wall=0.5, rounds=2, accepted=2),
            _run("specmesh", SPEC, "dynamic:8", 1, ids, wall=1.6, rounds=2, accepted=2),
            _run("specmesh", SPEC, "chain:5+adaptive", 1, ids, wall=0.5),  # not a fixed chain
            _run("hf", HF_TARGET, "", 1, ids, wall=4.0),
            _run("hf", HF_ASSISTED, "draft", 1, ids, wall=2.0, rounds=2, accepted=2)]
    spec1 = runs[2].row
    assert spec1.tokens_per_s == 8.0 and spec1.tokens_per_round == 2.0
    assert spec1.mean_accepted_per_round == 1.0 and runs[0].row.mean_accepted_per_round is None
    ratios = {r.name: r.value for r in compute_ratios([r.row for r in runs], ["chain:4"])}
    assert ratios == {"spec/target c=1 [chain:4]": 2.0, "target-only c=4/c=1": 2.0,
                      "spec c=4/c=1 [chain:4]": 2.0, "spec/target c=4 [chain:4]": 2.0,
                      "ours spec [chain:4] / hf assisted c=1": 2.0,
                      "ours target-only / hf target-only c=1": 2.0,
                      "hf assisted / hf target-only c=1": 2.0,
                      "best spec/target c=1 [chain:5+adaptive]": 4.0,
                      "best spec / hf assisted c=1 [chain:5+adaptive]": 4.0,
                      "best dynamic / best chain c=1 [dynamic:8 / chain:4]": 0.625}
    assert check_outputs(runs, 4).total == 0
    assert "specmesh spec chain:4" in format_table([r.row for r in runs])


def test_check_outputs_finds_each_kind_of_mismatch():
    ref = {0: [1, 2, 3], 1: [4, 5, 6]}
    runs = [_run("specmesh", TARGET, "", 1, ref),
            _run("specmesh", TARGET, "", 2, {0: [1, 2, 3], 1: [4, 5, 7]}),
            _run("specmesh", SPEC, "chain:4", 1, {0: [1, 9, 3], 1: [4, 5]}),
            _run("hf", HF_TARGET, "", 1, ref)]
    check = check_outputs(runs, 3)
    assert check.counts["batching"] == 1 and check.counts["short"] == 1
    assert check.counts["spec_vs_target"] == 2 and check.counts["hf_vs_ours"] == 0
    assert any("at token 1" in d for d in check.details)


def test_hf_differences_in_bf16_are_listed_not_counted():
    ref = {0: [1, 2, 3]}
    runs = [_run("specmesh", TARGET, "", 1, ref),
            _run("specmesh", SPEC, "chain:4", 1, {0: [1, 2, 8]}),
            _run("hf", HF_TARGET, "", 1, {0: [1, 7, 3]}),
            _run("hf", HF_ASSISTED, "draft", 1, {0: [1, 7, 3]})]
    check = check_outputs(runs, 3, hf_exact=False)
    assert check.total == 1 and check.counts["spec_vs_target"] == 1  # ours: still exact
    assert len(check.uncounted) == 2 and all("at token 1" in d for d in check.uncounted)
    assert check_outputs(runs, 3).total == 3  # fp32: HF counts too
    report = format_report("t", [r.row for r in runs], [], check, {})
    assert "not counted" in report and "OUTPUT MISMATCHES" in report


def test_bench_tiny_pair_end_to_end(models, tmp_path):
    plot = tmp_path / "bench.png"
    env = dict(os.environ, SPECMESH_MODEL_DIR=str(models))
    proc = subprocess.run(
        [sys.executable, "-m", "specmesh.loadtest.bench", "--target", str(models / TINY_TARGET),
         "--draft", str(models / TINY_DRAFT), "--concurrency", "1,2", "--max-new-tokens", "16",
         "--num-prompts", "2", "--repeats", "2", "--json", "--plot", str(plot)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout)  # the default tree: chain:5
    modes = {(r["mode"], r["concurrency"]) for r in out["rows"]}
    assert modes == {("specmesh target-only", 1), ("specmesh target-only", 2),
                     ("specmesh spec chain:5", 1), ("specmesh spec chain:5", 2),
                     ("hf target-only", 1), ("hf assisted", 1)}
    for row in out["rows"]:
        assert row["num_requests"] == 2 * 2  # max(c, num_prompts) x repeats
        assert row["num_tokens"] == 16 * row["num_requests"] and row["tokens_per_s"] > 0
        assert row["latency_p95_s"] >= row["latency_p50_s"] >= row["ttft_p50_s"] > 0
    assert set(out["ratios"]) >= {"spec/target c=1 [chain:5]", "target-only c=2/c=1",
                                  "spec c=2/c=1 [chain:5]", "spec/target c=2 [chain:5]",
                                  "ours spec [chain:5] / hf assisted c=1",
                                  "ours target-only / hf target-only c=1"}
    assert out["mismatches"]["total"] == 0, out["mismatches"]["details"]
    assert plot.exists() and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
