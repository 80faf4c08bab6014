"""Draft chains through `kernels/csrc/chain_f16.c`: the same next tokens and bitwise the same
KV as the Python path (one `ModelRunner.forward` per depth + argmax), for a batch of sequences
of different lengths; and the draft engine proposes the same chains (and, sampling, the same
draft distributions from the same seeded draws) with it on and off."""

from __future__ import annotations

import pathlib

import pytest
import torch

from specmesh.kernels import cpu_chain, cpu_layer, cpu_linear
from specmesh.kernels.kv_cache import PagedKVCache
from specmesh.kernels.loader import LoadedModel
from specmesh.kernels.runner import ForwardItem, ModelRunner
from tests.kernels.test_cpu_layer import _model

needs_kernels = pytest.mark.skipif(
    not cpu_linear.available() or cpu_layer._library() is None or cpu_chain._library() is None,
    reason="CPU kernels unavailable (no compiler or AVX-512)")


def _runner(model) -> ModelRunner:
    loaded = LoadedModel(model, model.config, pathlib.Path("tiny"), torch.float32,
                         torch.device("cpu"), "fp")
    kv = PagedKVCache(model.config.num_layers, model.config.num_kv_heads,
                      model.config.head_dim, 4, 32)
    runner = ModelRunner(loaded, kv)
    for seq, prompt in (("a", [5, 9, 12, 3, 40, 7, 1]), ("b", [8, 2, 33])):
        kv.create(seq)
        kv.reserve(seq, len(prompt) + 8)
        runner.forward([ForwardItem(seq, prompt)])
    return runner


@needs_kernels
@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_chain_equals_a_forward_and_argmax_per_depth(quantize):
    model = _model(layers=3, quantize=quantize)
    assert (getattr(model.model.layers[0].mlp.down_proj, "weight_q8", None) is not None) \
        == (quantize == "int8")
    chain = cpu_chain.ChainRunner.build(model)
    assert chain is not None
    py, c = _runner(model), _runner(model)
    first, steps = [11, 21], 5
    assert chain.fits(c.kv, ["a", "b"], steps)
    got = chain.run(c.kv, ["a", "b"], first, steps)
    want, tokens = [[], []], list(first)
    for _ in range(steps):
        outs = py.forward([ForwardItem("a", [tokens[0]]), ForwardItem("b", [tokens[1]])])
        tokens = [int(torch.argmax(o.logits[0])) for o in outs]
        want[0].append(tokens[0])
        want[1].append(tokens[1])
    assert got == want
    assert [c.kv.num_tokens(s) for s in "ab"] == [py.kv.num_tokens(s) for s in "ab"] == [12, 8]
    assert torch.equal(c.kv.k, py.kv.k) and torch.equal(c.kv.v, py.kv.v)


@needs_kernels
def test_not_used_where_the_model_does_not_run_fused(monkeypatch):
    model = _model()
    chain = cpu_chain.ChainRunner.build(model)
    model.set_batch_invariant(True)  # the invariant path's own kernels
    assert not chain.fits(_runner(_model()).kv, ["a"], 2)
    monkeypatch.setenv("SPECMESH_CPU_CHAIN", "0")
    assert cpu_chain.ChainRunner.build(_model()) is None


@needs_kernels
@pytest.mark.parametrize("temperature,quantize", [(0.0, "none"), (0.8, "none"),
                                                  (0.0, "int8"), (0.8, "int8")])
def test_draft_engine_proposes_the_same_chains(models, temperature, quantize):
    from specmesh.draft_service.engine import DraftEngine, ProposeItem
    from specmesh.kernels import load_for_service
    from specmesh.kernels.sampling import SamplingConfig
    from specmesh.model_service.config import EngineConfig
    from specmesh.wire.tree_spec import TreeSpec

    loaded = load_for_service(models / "stories260K-draft2L-wide5M", "float32", "cpu", None,
                              quantize=quantize)
    engines = [DraftEngine(loaded, EngineConfig()) for _ in range(2)]
    assert engines[0].chain is not None
    engines[1].chain = None  # the Python path
    prompt = [1, 403, 407, 261, 378, 411, 273, 334, 306, 365]
    runs = []
    for engine in engines:
        out, cached, tokens = [], 0, list(prompt)
        for _ in range(3):  # accept two nodes each round, as a verifier might
            res = engine.propose_batch([ProposeItem(
                seq_id="s", num_cached_tokens=cached, new_tokens=tokens[cached:],
                spec=TreeSpec.parse("chain:5"), seed=7,
                sampling=SamplingConfig(temperature=temperature, top_p=0.95))])[0]
            dists = [d if d is None else (d[0].tolist(), d[1].tolist()) for d in res.draft_dists]
            out.append((res.tokens, res.parents, res.num_cached_tokens, dists))
            # the draft keeps its chain's fed nodes: ours are the two accepted ones
            cached = min(res.num_cached_tokens, len(tokens) + 2)
            tokens = tokens + res.tokens[:2] + [7]
        runs.append(out)
    assert runs[0] == runs[1] and len(runs[0][0][0]) == 5
    assert bool(runs[0][0][3]) == (temperature > 0)  # sampling: the draft distributions


@needs_kernels
def test_sampled_chains_run_in_one_c_call(models, monkeypatch):
    """A batch mixing a greedy row and sampled rows (top-k, top-p) takes `run_sampled` (all
    depths in one C call) and proposes what the depth-by-depth Python path proposes."""
    from specmesh.draft_service.engine import DraftEngine, ProposeItem
    from specmesh.kernels import load_for_service
    from specmesh.kernels.sampling import SamplingConfig
    from specmesh.model_service.config import EngineConfig
    from specmesh.wire.tree_spec import TreeSpec

    loaded = load_for_service(models / "stories260K-draft2L-wide5M", "float32", "cpu", None,
                              quantize="int8")  # as the draft service serves it
    engines = [DraftEngine(loaded, EngineConfig()) for _ in range(2)]
    engines[1].chain = None  # the Python path
    calls = []
    real = cpu_chain.ChainRunner.run_sampled
    monkeypatch.setattr(cpu_chain.ChainRunner, "run_sampled",
                        lambda self, *a: calls.append(a[3]) or real(self, *a))
    configs = [SamplingConfig(), SamplingConfig(0.8, 0.9, 20), SamplingConfig(1.2, 1.0),
               SamplingConfig(0.6, 0.5)]
    prompts = [[1, 403, 407, 261], [1, 9, 88, 301, 5], [1, 44, 45], [1, 403, 261, 385, 64]]
    runs = []
    for engine in engines:
        res = engine.propose_batch([ProposeItem(
            seq_id=f"s{i}", num_cached_tokens=0, new_tokens=p, spec=TreeSpec.parse("chain:6"),
            seed=11 + i, sampling=cfg) for i, (p, cfg) in enumerate(zip(prompts, configs))])
        runs.append([(r.tokens, r.parents, [d if d is None else (d[0].tolist(), d[1].tolist())
                                             for d in r.draft_dists]) for r in res])
    assert calls == [5]  # one C call for the five depths after the root, all four rows
    assert runs[0] == runs[1]
    assert not runs[0][0][2] and all(len(r[2]) == 7 for r in runs[0][1:])
