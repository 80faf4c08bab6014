"""The engine bench runs end to end and times the draft as the draft service serves it."""

from __future__ import annotations

import json

from specmesh.kernels import bench_forward, cpu_linear
from tests.conftest import WIDE_DRAFT, WIDE_TARGET


def _bench(models, capsys, quantize: str) -> dict:
    bench_forward.main(["--target", str(models / WIDE_TARGET), "--draft", str(models / WIDE_DRAFT),
                        "--rows", "1,2", "--repeats", "1", "--draft-quantize", quantize,
                        "--json"])
    return json.loads(capsys.readouterr().out)


def test_engine_bench_reports_every_case_and_the_draft_weights_as_served(models, capsys):
    fp16, int8 = _bench(models, capsys, "none"), _bench(models, capsys, "int8")
    for res, quantize in ((fp16, "none"), (int8, "int8")):
        assert set(res["times"]) == {"target sweep", "draft sweep", "target rows=1",
                                     "target rows=2", "draft rows=1", "draft rows=3"}
        assert all(t["min_ms"] > 0 for t in res["times"].values())
        assert res["draft_quantize"] == quantize
        rate = res["gflop_s"]  # 2 multiply-adds' FLOPs a weight a row, over the forward's time
        params = res["projection_params"]["target"]
        assert rate["target rows=2"] == 2 * params * 2 / res["times"]["target rows=2"]["median_ms"] / 1e6
        assert 70e6 < params < 90e6  # the 78M stand-in's projections and LM head
    assert int8["weight_bytes"]["target"] == fp16["weight_bytes"]["target"]  # target as ever
    if cpu_linear.available():  # the layers' projections: 2 bytes a weight -> 1 (lm_head: 2)
        assert 0.5 < int8["weight_bytes"]["draft"] / fp16["weight_bytes"]["draft"] < 0.55
