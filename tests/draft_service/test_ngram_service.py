"""N-gram drafting through real servers: a model-free draft service (`--method ngram`) and a
model draft service serving n-gram trees beside model trees; greedy output is always the
target-only output."""

from __future__ import annotations

import asyncio

import pytest

from specmesh.clients.async_client import AsyncSpecMeshClient
from tests.conftest import TINY_DRAFT, TINY_TARGET
from tests.stack import model_server

pytestmark = pytest.mark.models
PROMPT = "One day, a girl saw a cat. One day, a boy saw a dog. One day, a"


async def test_a_model_free_draft_service_keeps_the_target_output(models):
    async with model_server("verify", models / TINY_TARGET) as (v, _), \
            model_server("draft", None, method="ngram") as (d, servicer):
        assert servicer.engine is None
        async with AsyncSpecMeshClient(v, d, str(models / TINY_TARGET)) as client:
            assert client.draft_info.name == "ngram"
            plain = await client.generate(PROMPT, 48, ignore_eos=True, speculate=False)
            # ngram trees of two sizes, and a model tree spec (drafted by n-gram lookup here)
            for tree in ("ngram:4", "ngram:16", "chain:4"):
                out = await client.generate(PROMPT, 48, ignore_eos=True, tree=tree)
                assert out.token_ids == plain.token_ids, tree
                assert out.stats.num_accepted_tokens > 0, tree
            sampled = await client.generate(PROMPT, 16, temperature=0.8, seed=3, tree="ngram:8")
            assert len(sampled.token_ids) == 16


async def test_one_draft_service_serves_model_and_ngram_trees_side_by_side(models):
    async with model_server("verify", models / TINY_TARGET) as (v, _), \
            model_server("draft", models / TINY_DRAFT) as (d, _):
        async with AsyncSpecMeshClient(v, d, str(models / TINY_TARGET)) as client:
            plain = await client.generate(PROMPT, 40, ignore_eos=True, speculate=False)
            outs = await asyncio.gather(*(
                client.generate(PROMPT, 40, ignore_eos=True, tree=tree)
                for tree in ("dynamic:8", "ngram:8", "chain:4", "ngram:12")))
            for out in outs:
                assert out.token_ids == plain.token_ids
                assert out.stats.num_accepted_tokens > 0


GROUNDED = ("Read the passage and answer.\n\nPassage: The Amazon rainforest covers much of the "
            "Amazon basin of South America. The basin spans 7 million square kilometres, of which "
            "5.5 million square kilometres are covered by the rainforest.\n\nQuestion: Repeat the "
            "second sentence of the passage exactly.")


async def test_real_gguf_model_with_ngram_drafting_keeps_the_target_output():
    from specmesh.clients.cli import chat_prompts
    from specmesh.clients.models import packaged_model

    try:
        path = packaged_model("smollm2")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    async with model_server("verify", path) as (v, _), \
            model_server("draft", None, method="ngram") as (d, _):
        async with AsyncSpecMeshClient(v, d, str(path)) as client:
            (ids,) = chat_prompts(path, [GROUNDED], client.codec)
            plain = await client.generate(ids, 40, speculate=False)
            for tree in ("chain:6", "ngram:10"):
                out = await client.generate(ids, 40, tree=tree)
                assert out.token_ids == plain.token_ids, tree
                assert out.stats.num_accepted_tokens >= 5, (tree, out.stats)
    assert "5.5 million" in client.codec.decode(plain.token_ids)
