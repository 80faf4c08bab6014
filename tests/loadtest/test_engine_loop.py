"""`python -m specmesh.loadtest.engine_loop`: both engines in one process, modes interleaved,
outputs checked identical (the tiny pair, a few tokens)."""

from __future__ import annotations

from specmesh.loadtest import engine_loop


def test_engine_loop_reports_every_mode_and_identical_outputs(models, capsys):
    engine_loop.main(["--target", str(models / "stories260K"),
                      "--draft", str(models / "stories260K-draft2L"),
                      "--trees", "chain:2,dynamic:4",
                      "--num-prompts", "2", "--max-new-tokens", "12", "--repeats", "1",
                      "--threads", "1", "--ab-cpu-layer"])
    out = capsys.readouterr().out
    for mode in ("target-only [fused]", "chain:2 [ops]", "dynamic:4 [fused]"):
        assert mode in out
    assert "all identical token for token" in out
