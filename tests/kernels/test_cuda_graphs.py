"""`kernels.cuda_graphs`: the padded, staged forward gives the eager forward's logits and KV.

On the CPU nothing is captured, but everything else runs as on a GPU (the staging layout, the
padding sequence on scratch blocks, the full-width attention plan, the logits rows); on a GPU
(marked `gpu`) the captured graph is replayed.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from specmesh.kernels import cuda_graphs
from specmesh.kernels.config import ModelConfig
from specmesh.kernels.cuda_chain import CudaChain
from specmesh.kernels.cuda_graphs import SIZES, CudaGraphs, staging_layout
from specmesh.kernels.kv_cache import PagedKVCache
from specmesh.kernels.loader import load_model
from specmesh.kernels.model import Transformer
from specmesh.kernels.runner import ForwardItem, ModelRunner
from specmesh.kernels.tree import compile_tree
from tests.conftest import TINY_DRAFT, TINY_TARGET


def _runner(loaded, graphs: bool) -> ModelRunner:
    cfg = loaded.config
    kv = PagedKVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, block_size=4,
                      num_blocks=400, dtype=loaded.dtype, device=loaded.device)
    runner = ModelRunner(loaded, kv)
    if not graphs:
        runner.graphs = None  # eager, also on a GPU
    elif runner.graphs is None:  # CPU: the same path, run eagerly
        runner.graphs = CudaGraphs(loaded, kv, kv.take_scratch(SIZES[-1] // 4), width=128)
    return runner


def _steps(runner: ModelRunner) -> list[list[torch.Tensor]]:
    """Prefill two sequences, verify a tree on one and a chain on the other, commit, decode:
    the logits of every forward."""
    kv, out = runner.kv, []
    for seq, prompt in (("a", [1, 403, 261, 385, 64, 21]), ("b", [1, 9, 88, 301, 5, 6, 7, 8, 9])):
        kv.create(seq)
        kv.reserve(seq, 64)
    out.append([o.logits for o in runner.forward([
        ForwardItem("a", [1, 403, 261, 385, 64, 21]), ForwardItem("b", [1, 9, 88, 301, 5, 6])])])
    tree = compile_tree([17, 18, 19, 20, 21], [-1, 0, 0, 1, 3])
    chain = compile_tree([30, 31, 32], [-1, 0, 1])
    out.append([o.logits for o in runner.forward([
        ForwardItem("a", [33], tree), ForwardItem("b", [34, 35], chain)])])
    runner.commit_tree_path("a", [0, 1, 3])
    runner.commit_tree_path("b", [0])
    out.append([o.logits for o in runner.forward([ForwardItem("b", [36]),
                                                  ForwardItem("a", [37])])])
    out.append([o.logits for o in runner.forward([ForwardItem("a", [38])])])
    return out


def _kv(runner: ModelRunner, seq: str) -> torch.Tensor:
    table = runner.kv.block_table(seq)
    n = runner.kv.num_tokens(seq)
    pos = torch.arange(n)
    idx = torch.tensor(table)[pos // runner.kv.block_size], pos % runner.kv.block_size
    return torch.stack([runner.kv.k[:, idx[0], idx[1]], runner.kv.v[:, idx[0], idx[1]]])


def _check_same(loaded, atol: float) -> None:
    eager, graphed = _runner(loaded, False), _runner(loaded, True)
    for want, got in zip(_steps(eager), _steps(graphed)):
        for w, g in zip(want, got):
            assert w.shape == g.shape
            torch.testing.assert_close(g, w, atol=atol, rtol=1e-5)  # other GEMM shapes
    for seq in ("a", "b"):
        assert eager.kv.num_tokens(seq) == graphed.kv.num_tokens(seq)
        torch.testing.assert_close(_kv(graphed, seq), _kv(eager, seq), atol=atol, rtol=1e-5)
    assert set(graphed.graphs.graphs) <= set(SIZES)
    assert len(graphed.graphs.graphs) >= 2  # the 12-row prefill, 10-row verify, 2- and 1-row


@pytest.mark.models
def test_padded_staged_forward_equals_eager_on_cpu(models):
    _check_same(load_model(models / TINY_TARGET), atol=1e-5)


def _random_model(folder) -> None:
    """A 2-layer Llama with random weights and head_dim 32 (the CUDA kernel's smallest; the
    tiny real models' 8 falls back to the reference, which graphs do not capture)."""
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512,
              "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
              "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0}
    (folder / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_dict(config))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(folder / "model.safetensors"))


@pytest.fixture
def gpu_model(tmp_path):
    """The random head_dim-32 model, fp32 on the GPU (skips without one)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    _random_model(tmp_path)
    return load_model(tmp_path, torch.float32, "cuda")


@pytest.mark.gpu
def test_captured_graphs_equal_eager_on_gpu(gpu_model):
    loaded = gpu_model
    assert _runner(loaded, True).graphs.on_gpu
    _check_same(loaded, atol=1e-3)


def test_staging_layout_is_packed_and_disjoint():
    layout = staging_layout(8, 5)
    spans = sorted(layout.values())
    assert spans[0][0] == 0
    for (o1, n1), (o2, _) in zip(spans, spans[1:]):
        assert o1 + n1 == o2  # back to back
    assert layout["block_tables"] == (spans[-1][0], 9 * 5)


@pytest.mark.models
def test_graphs_off_on_cpu_and_when_disabled(models, monkeypatch):
    loaded = load_model(models / TINY_TARGET)
    assert ModelRunner(loaded, PagedKVCache(5, 4, 8, 4, 200)).graphs is None  # CPU
    monkeypatch.setenv("SPECMESH_CUDA_GRAPHS", "0")
    assert not cuda_graphs.enabled()


def _chain_tokens(runner: ModelRunner, chain: CudaChain | None, steps: int) -> list[list[int]]:
    """Prefill three sequences of different lengths, then a greedy chain of `steps` depths from
    each one's last argmax: through `chain`, or one eager runner forward per depth."""
    kv, seqs = runner.kv, {"a": [1, 403, 261, 385], "b": [1, 9, 88, 301, 5, 6, 7], "c": [1, 44]}
    for seq, prompt in seqs.items():
        kv.create(seq)
        kv.reserve(seq, 40)
    outs = runner.forward([ForwardItem(s, p) for s, p in seqs.items()])
    first = [int(o.logits[0].argmax()) for o in outs]
    if chain is not None:
        assert chain.fits(kv, list(seqs), steps)
        return chain.run(kv, list(seqs), first, steps)
    tokens, got = first, [[] for _ in seqs]
    for _ in range(steps):
        outs = runner.forward([ForwardItem(s, [t]) for s, t in zip(seqs, tokens)])
        tokens = [int(o.logits[0].argmax()) for o in outs]
        for row, t in zip(got, tokens):
            row.append(t)
    return got


def _check_chain(loaded) -> None:
    eager, graphed = _runner(loaded, False), _runner(loaded, True)
    want = _chain_tokens(eager, None, 5)
    assert _chain_tokens(graphed, CudaChain(loaded, graphed.graphs), 5) == want
    for seq in ("a", "b", "c"):
        assert graphed.kv.num_tokens(seq) == eager.kv.num_tokens(seq)
        torch.testing.assert_close(_kv(graphed, seq), _kv(eager, seq), atol=1e-4, rtol=1e-5)


@pytest.mark.models
def test_greedy_chain_graph_equals_per_depth_forwards_on_cpu(models):
    _check_chain(load_model(models / TINY_TARGET))


@pytest.mark.gpu
def test_captured_chain_equals_per_depth_forwards_on_gpu(gpu_model):
    _check_chain(gpu_model)


def _draft_engines(models):
    """(an engine whose chains run through a CudaChain, eagerly on the CPU; a plain one)."""
    from specmesh.draft_service.engine import DraftEngine

    loaded = load_model(models / TINY_DRAFT)
    engine, plain = DraftEngine(loaded), DraftEngine(load_model(models / TINY_DRAFT))
    plain.chain = None  # one forward per depth
    graphs = CudaGraphs(loaded, engine.kv, engine.kv.take_scratch(16), width=32)
    engine.runner.graphs, engine.chain = graphs, CudaChain(loaded, graphs)
    return engine, plain


def _propose(engine, sampling=()):
    """Two chains (sampling: one greedy row, then each config given); tokens, parents, the
    draft distributions sent."""
    from specmesh.draft_service.engine import ProposeItem
    from specmesh.kernels.sampling import SamplingConfig
    from specmesh.wire.tree_spec import TreeSpec

    configs = [SamplingConfig(), *sampling] if sampling else [SamplingConfig()] * 2
    prompts = [[1, 403, 261, 385], [1, 9, 88], [1, 44, 45, 46]]
    items = [ProposeItem(seq_id=f"s{i}", num_cached_tokens=0, new_tokens=prompts[i],
                         spec=TreeSpec.parse("chain:5"), sampling=cfg, seed=5 + i)
             for i, cfg in enumerate(configs)]
    return [(r.tokens, r.parents, r.num_cached_tokens,
             [d if d is None else (d[0].tolist(), np.round(d[1].astype(np.float32), 3).tolist())
              for d in r.draft_dists]) for r in engine.propose_batch(items)]


@pytest.mark.models
def test_draft_engine_chains_through_the_chain_graph(models):
    engine, plain = _draft_engines(models)
    assert _propose(engine) == _propose(plain)
    assert (2, 4, False) in engine.chain.chains  # both chains' last 4 depths in one graph


@pytest.mark.models
def test_draft_engine_samples_chains_through_the_chain_graph(models):
    """Sampled rows (top-p, top-k, a greedy row beside them) draw on the device path, in one
    graph, what the depth-by-depth path draws from the same generators."""
    from specmesh.kernels.sampling import SamplingConfig

    engine, plain = _draft_engines(models)
    sampling = (SamplingConfig(0.8, 0.95), SamplingConfig(1.1, 0.9, 30))
    got, want = _propose(engine, sampling), _propose(plain, sampling)
    assert got == want
    assert (4, 4, True) in engine.chain.chains and all(len(r[3]) == 6 for r in got[1:])


def test_device_sampling_matches_the_draft_numpy_path():
    from specmesh.draft_service import draft_sampling
    from specmesh.kernels.device_sampling import sample_rows
    from specmesh.kernels.sampling import SamplingConfig

    configs = [SamplingConfig(0.8, 0.95), SamplingConfig(1.0, 1.0), SamplingConfig(0.7, 0.5, 20),
               SamplingConfig(1.3, 1.0, 3), SamplingConfig()]
    logits = torch.randn(len(configs), 300, generator=torch.Generator().manual_seed(4)) * 3
    expo = torch.empty(len(configs), 300, dtype=torch.float64).exponential_(
        generator=torch.Generator().manual_seed(9))
    tokens, q = sample_rows(logits, expo, torch.tensor([c.temperature for c in configs]),
                            torch.tensor([1 - c.top_p if c.top_p < 1 else 0.0 for c in configs]),
                            torch.tensor([c.top_k for c in configs]))
    for row, cfg in enumerate(configs[:-1]):
        want = draft_sampling.draft_probs(logits[row:row + 1].numpy(), cfg)[0]
        np.testing.assert_allclose(q[row].numpy(), want, atol=1e-6)
        with np.errstate(divide="ignore"):
            assert int(tokens[row]) == int(np.argmin(expo[row].numpy() / want))
    assert int(tokens[-1]) == int(logits[-1].argmax()) and not q[-1].any()  # greedy row


@pytest.mark.models
def test_draft_engine_falls_back_when_the_chain_graph_fails(models, monkeypatch):
    engine, plain = _draft_engines(models)

    def broken(self, chain):
        raise RuntimeError("capture failed")
    monkeypatch.setattr(CudaChain, "_forward", broken)
    assert _propose(engine) == _propose(plain)
    assert engine.chain is None  # turned off, logged; depths run one forward each


@pytest.mark.gpu
def test_captured_sampled_chain_equals_its_eager_run_on_gpu(gpu_model):
    from specmesh.kernels.cpu_chain import ChainDraws

    loaded = gpu_model
    results = []
    for capture in (True, False):
        runner = _runner(loaded, True)
        runner.graphs.on_gpu = capture  # False: the same ops run eagerly, nothing captured
        kv, seqs = runner.kv, {"a": [1, 403, 261, 385], "b": [1, 9, 88, 301, 5]}
        for seq in seqs:
            kv.create(seq)
            kv.reserve(seq, 40)
        outs = runner.forward([ForwardItem(s, p) for s, p in seqs.items()])
        first = [int(o.logits[0].argmax()) for o in outs]
        expo = torch.empty(2, 4, 512, dtype=torch.float64).exponential_(
            generator=torch.Generator().manual_seed(3))
        draws = ChainDraws([0.8, 0.0], [0.95, 1.0], [0, 0], expo)
        results.append(CudaChain(loaded, runner.graphs).run_sampled(kv, list(seqs), first, 4,
                                                                    draws))
    (t1, q1), (t2, q2) = results
    assert t1 == t2
    torch.testing.assert_close(q1, q2, atol=1e-6, rtol=0)
    assert q1[0].sum(-1).allclose(torch.ones(4)) and not q1[1].any()  # sampled row, greedy row


@pytest.mark.models
def test_sampled_chains_too_big_to_stage_run_depth_by_depth(models, monkeypatch):
    from specmesh.kernels import cuda_chain
    from specmesh.kernels.sampling import SamplingConfig

    monkeypatch.setattr(cuda_chain, "SAMPLED_MAX_BYTES", 0)
    engine, plain = _draft_engines(models)
    sampling = (SamplingConfig(0.8, 0.95),)
    assert _propose(engine, sampling) == _propose(plain, sampling)
    assert engine.chain is not None and not any(k[2] for k in engine.chain.chains)
