"""Our Llama implementation's logits equal HF transformers' (fp32, max abs diff < 1e-4)."""

from __future__ import annotations

import pytest
import torch

from specmesh.kernels import load_model
from specmesh.kernels.attention_metadata import SequenceStep, build_metadata
from specmesh.kernels.kv_cache import PagedKVCache
from specmesh.kernels.runner import ForwardItem, ModelRunner
from tests.conftest import TINY_DRAFT, TINY_TARGET, WIDE_DRAFT, WIDE_TARGET

pytestmark = pytest.mark.models
IDS = [1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 45, 99,
       100, 17, 260]


@pytest.fixture(scope="module", params=[TINY_TARGET, TINY_DRAFT, WIDE_TARGET, WIDE_DRAFT])
def pair(request, models):
    from transformers import AutoModelForCausalLM

    path = models / request.param
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([IDS])).logits[0]  # [T, vocab]
    return load_model(path), ref


def _cache(lm, block_size=4, num_blocks=64):
    c = lm.config
    kv = PagedKVCache(c.num_layers, c.num_kv_heads, c.head_dim, block_size, num_blocks)
    kv._free.reverse()  # hand out blocks in a scrambled order: paging must not matter
    return kv


def test_full_context_logits_match_hf(pair):
    lm, ref = pair
    kv = _cache(lm)
    kv.create("s")
    kv.reserve("s", len(IDS))
    meta = build_metadata([SequenceStep(kv.block_table("s"), 0, len(IDS))], kv.block_size)
    logits = lm.model(torch.tensor(IDS), torch.arange(len(IDS)), meta, kv.k, kv.v)
    assert (logits - ref).abs().max().item() < 1e-4


def test_incremental_logits_match_hf(pair):
    """Prefill a few tokens, then decode one token per step through the KV cache."""
    lm, ref = pair
    kv = _cache(lm)
    runner = ModelRunner(lm, kv)
    kv.create("s")
    rows = []
    for chunk in ([IDS[:5]] + [[t] for t in IDS[5:]]):
        kv.reserve("s", kv.num_tokens("s") + len(chunk))
        rows.append(runner.forward([ForwardItem("s", chunk)])[0].logits[0])
    got = torch.stack(rows)  # [T - 4, vocab]
    assert (got - ref[4:]).abs().max().item() < 1e-4


def test_truncation_is_exact(pair):
    """Rolling back to a committed length and re-decoding gives the same logits."""
    lm, ref = pair
    kv = _cache(lm)
    runner = ModelRunner(lm, kv)
    kv.create("s")
    kv.reserve("s", 12)
    runner.forward([ForwardItem("s", IDS[:12])])
    kv.truncate("s", 7)
    kv.reserve("s", 8)
    out = runner.forward([ForwardItem("s", [IDS[7]])])[0].logits[0]
    assert (out - ref[7]).abs().max().item() < 1e-4
