"""Batch-invariant mode: a position's logits are bitwise the same alone, with 15 random batch
mates, and as a tree node (kernels.invariant)."""

from __future__ import annotations

import random

import pytest
import torch

from specmesh.kernels.kv_cache import PagedKVCache
from specmesh.kernels.loader import load_model
from specmesh.kernels.runner import ForwardItem, ModelRunner
from specmesh.kernels.tree import compile_tree
from tests.conftest import TINY_TARGET, WIDE_DRAFT

pytestmark = pytest.mark.models


def runner_for(loaded) -> ModelRunner:
    cfg = loaded.config
    kv = PagedKVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 16, 256, loaded.dtype,
                      loaded.device)
    return ModelRunner(loaded, kv)


def last_logits(runner: ModelRunner, items: list[ForwardItem], name: str) -> torch.Tensor:
    for it in items:
        runner.kv.create(it.seq_id)
        n = len(it.new_tokens) + (it.tree.num_nodes if it.tree is not None else 0)
        runner.kv.reserve(it.seq_id, n)
    outs = runner.forward(items)
    for it in items:
        runner.kv.free(it.seq_id)
    out = outs[[it.seq_id for it in items].index(name)]
    return out.logits[-1]


def _cpu_kernels_available() -> bool:
    from specmesh.kernels import cpu_attention, cpu_linear, cpu_norm

    return cpu_linear.available() and cpu_attention._library() is not None \
        and cpu_norm._library() is not None


@pytest.mark.parametrize("model,invariant", [
    (TINY_TARGET, True),  # the slow invariant mode, any checkpoint
    # the default mode for an fp16 checkpoint on our CPU kernels: invariant at full speed
    pytest.param(WIDE_DRAFT, False, marks=pytest.mark.skipif(
        not _cpu_kernels_available(), reason="CPU kernels unavailable")),
])
def test_logits_do_not_depend_on_the_batch_or_the_tree(models, model, invariant):
    loaded = load_model(models / model)
    loaded.model.set_batch_invariant(invariant)
    runner = runner_for(loaded)
    rng = random.Random(0)
    prompt = [1] + [rng.randint(3, 511) for _ in range(40)]
    alone = last_logits(runner, [ForwardItem("s", prompt)], "s")
    mates = [ForwardItem(f"m{i}", [1] + [rng.randint(3, 511) for _ in range(rng.randint(1, 60))])
             for i in range(15)]
    batched = last_logits(runner, mates[:7] + [ForwardItem("s", prompt)] + mates[7:], "s")
    k = 5  # the last k tokens as a chain tree after the causal part
    tree = compile_tree(prompt[-k:], list(range(-1, k - 1)))
    as_node = last_logits(runner, [ForwardItem("s", prompt[:-k], tree)] + mates[:3], "s")
    assert torch.equal(alone, batched)
    assert torch.equal(alone, as_node)


def test_invariant_mode_matches_the_default_closely(models):
    loaded = load_model(models / TINY_TARGET)
    prompt = [1, 403, 407, 261, 300, 301]
    fast = last_logits(runner_for(loaded), [ForwardItem("s", prompt)], "s")
    loaded.model.set_batch_invariant(True)
    slow = last_logits(runner_for(loaded), [ForwardItem("s", prompt)], "s")
    assert torch.allclose(fast, slow, atol=1e-4)


async def test_batch_invariant_services_give_target_only_tokens_under_batching(models):
    """With --batch-invariant, speculative decoding of concurrent requests equals target-only
    decoding of each alone, even at near ties (no arithmetic depends on batch mates)."""
    import asyncio

    from specmesh.clients.async_client import AsyncSpecMeshClient
    from specmesh.clients.types import GenerationParams
    from specmesh.wire.tree_spec import TreeSpec
    from tests.conftest import TINY_DRAFT
    from tests.stack import spec_stack

    prompts = [[1, 403, 407], [1, 300], [1, 261, 9, 500], [1, 42, 43, 44, 45]]
    async with spec_stack(models / TINY_TARGET, models / TINY_DRAFT,
                          batch_invariant=True) as (verify, draft), \
            AsyncSpecMeshClient(verify, draft) as client:
        alone = [await client.generate(p, params=GenerationParams(
            max_new_tokens=24, ignore_eos=True, speculate=False)) for p in prompts]
        together = await asyncio.gather(*(client.generate(p, params=GenerationParams(
            max_new_tokens=24, ignore_eos=True, tree=TreeSpec.parse("dynamic:8")))
            for p in prompts))
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
