"""`specmesh generate` end to end: it starts its own local stack, prints JSON, stops the stack."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.conftest import TINY_DRAFT, TINY_TARGET

pytestmark = pytest.mark.models
KEYS = {"text", "token_ids", "num_rounds", "num_draft_tokens", "num_accepted_tokens",
        "tokens_per_s", "mean_accepted_per_round", "tree", "adaptive"}


def run_cli(models, *args):
    env = dict(os.environ, SPECMESH_MODEL_DIR=str(models))
    out = subprocess.run(["specmesh", "generate", "Once upon a time", "--json",
                          "--target", str(models / TINY_TARGET), "--draft",
                          str(models / TINY_DRAFT), *args],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_generate_json_spec_and_no_spec_agree(models):
    spec = run_cli(models, "--max-new-tokens", "32", "--k", "4")
    plain = run_cli(models, "--max-new-tokens", "32", "--no-spec")
    assert KEYS <= spec.keys()
    assert spec["token_ids"] == plain["token_ids"]
    assert spec["text"].startswith(", there was a little girl named Lily")
    assert spec["num_accepted_tokens"] > 0 and plain["num_draft_tokens"] == 0
    assert spec["tree"] == "chain:4"
    assert spec["adaptive"] is True and plain["adaptive"] is False  # the default: auto, on


def test_device_and_dtype_reach_the_model_services(models):
    """--device/--dtype go to both model services of the local stack (on a GPU: --device cuda
    --dtype bfloat16); explicit CPU float32 gives the default's tokens."""
    spec = run_cli(models, "--max-new-tokens", "16", "--device", "cpu", "--dtype", "float32",
                   "--no-cache")
    assert spec["text"].startswith(", there was a little girl named Lily")
    bad = subprocess.run(["specmesh", "generate", "hi", "--dtype", "float8"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--dtype" in bad.stderr


def test_stop_string_cuts_the_same_text_in_every_mode(models):
    runs = [run_cli(models, "--max-new-tokens", "60", "--stop", "Lily", *mode)
            for mode in (["--no-spec"], ["--k", "4"], ["--tree", "dynamic:8"])]
    assert len({r["text"] for r in runs}) == 1
    assert runs[0]["text"] == ", there was a little girl named "


def test_missing_models_give_a_clear_error(tmp_path):
    env = dict(os.environ, SPECMESH_MODEL_DIR=str(tmp_path))
    out = subprocess.run(["specmesh", "generate", "hi", "--json"], capture_output=True,
                         text=True, timeout=60, env=env)
    assert out.returncode == 2
    assert "SPECMESH_MODEL_DIR" in out.stderr and "not found" in out.stderr


@pytest.mark.parametrize("value", ["0", "4097"])
def test_max_new_tokens_limits_match_the_gateway(models, value):
    env = dict(os.environ, SPECMESH_MODEL_DIR=str(models))
    out = subprocess.run(["specmesh", "generate", "hi", "--max-new-tokens", value],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 2
    assert "max_new_tokens" in out.stderr and "[1, 4096]" in out.stderr, out.stderr


def test_up_prints_and_serves_every_services_metrics(models):
    """`specmesh up --metrics-port 0`: one metrics URL per service, printed; each parses as
    Prometheus text, every series labelled with its own service."""
    import shutil
    import signal
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from specmesh import Client

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not on PATH")
    env = dict(os.environ, SPECMESH_MODEL_DIR=str(models))
    proc = subprocess.Popen(["specmesh", "up", "--port", "0", "--http-port", "0",
                             "--metrics-port", "0", "--target", str(models / TINY_TARGET),
                             "--draft", str(models / TINY_DRAFT)],
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        urls = json.loads(proc.stdout.readline())
        with Client(urls["gateway"]) as client:
            assert client.generate("Once upon a time", max_new_tokens=8).token_ids
        metrics = urls["metrics"]
        assert set(metrics) == {"gateway", "verify", "draft", "cache"}
        for service, url in metrics.items():
            assert url.startswith("http://127.0.0.1:")
            text = urllib.request.urlopen(url, timeout=30).read().decode()
            families = {f.name: f for f in text_string_to_metric_families(text)}
            labelled = [s for f in families.values() for s in f.samples
                        if f.name.startswith("specmesh_")]
            assert labelled and {s.labels.get("service") for s in labelled} == {service}
            assert "specmesh_request_latency_seconds" in families, service
            if service == "cache":  # and the cache's own families
                assert "specmesh_cache_hits" in families
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0


def test_draft_ngram_needs_no_draft_model(models):
    """`--draft ngram`: a model-free draft service, tree ngram:8 by default, the target's text."""
    env = dict(os.environ, SPECMESH_MODEL_DIR=str(models))
    prompt = "One day, a girl saw a cat. One day, a boy saw a dog. One day, a"
    outs = []
    for mode in (["--draft", "ngram"], ["--no-spec"]):
        out = subprocess.run(["specmesh", "generate", prompt, "--json", "--no-cache",
                              "--target", str(models / TINY_TARGET), "--max-new-tokens", "24",
                              *mode], capture_output=True, text=True, timeout=300, env=env)
        assert out.returncode == 0, out.stderr[-2000:]
        outs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert outs[0]["token_ids"] == outs[1]["token_ids"]
    assert outs[0]["tree"] == "ngram:8" and outs[0]["num_accepted_tokens"] > 0


def test_ngram_fleet_needs_the_cache(models):
    env = dict(os.environ, SPECMESH_MODEL_DIR=str(models))
    out = subprocess.run(["specmesh", "generate", "Hi", "--draft", "ngram", "--ngram-fleet",
                          "--no-cache", "--target", str(models / TINY_TARGET)],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode != 0 and "drop --no-cache" in out.stderr
