"""Capstone: greedy speculative output == target-only output == HF generate, over real gRPC."""

from __future__ import annotations

import pytest
import torch

from specmesh.clients.async_client import AsyncSpecMeshClient
from tests.conftest import TINY_DRAFT, TINY_TARGET, WIDE_DRAFT, WIDE_TARGET
from tests.stack import spec_stack

PROMPTS = ["Once upon a time", "The little dog", "Tom and Sue went to the", "One day, a bird"]
pytestmark = pytest.mark.models


def hf_greedy(folder, prompt_ids: list[int], n: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False,
                         min_new_tokens=n, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


@pytest.fixture(scope="module")
def hf_reference(models):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(models / TINY_TARGET / "tokenizer.json"))
    return {p: hf_greedy(models / TINY_TARGET, tok.encode(p).ids, 40) for p in PROMPTS}


@pytest.mark.parametrize("tree", ["chain:1", "chain:3", "chain:5", "static:4,2,2,1",
                                  "static:2,2", "dynamic:16", "dynamic:8"])
async def test_greedy_speculative_equals_target_only_and_hf(models, hf_reference, tree):
    async with spec_stack(models / TINY_TARGET, models / TINY_DRAFT) as (verify, draft):
        async with AsyncSpecMeshClient(verify, draft, str(models / TINY_TARGET)) as client:
            for prompt in PROMPTS:
                # adaptive=False: this very tree every round (auto-adaptive would shrink it)
                spec = await client.generate(prompt, 40, tree=tree, adaptive=False,
                                             ignore_eos=True)
                plain = await client.generate(prompt, 40, speculate=False, ignore_eos=True)
                assert plain.token_ids == hf_reference[prompt]
                assert spec.token_ids == plain.token_ids, (tree, prompt)
                assert spec.stats.num_accepted_tokens > 0
                assert plain.stats.num_draft_tokens == 0


async def test_wide_pair_greedy_equals_target_only(models):
    async with spec_stack(models / WIDE_TARGET, models / WIDE_DRAFT) as (verify, draft):
        async with AsyncSpecMeshClient(verify, draft, str(models / WIDE_TARGET)) as client:
            spec = await client.generate(PROMPTS[0], 48, tree="chain:4", ignore_eos=True)
            plain = await client.generate(PROMPTS[0], 48, speculate=False, ignore_eos=True)
    assert spec.token_ids == plain.token_ids
    assert spec.stats.mean_accepted_per_round > 1.0


async def test_concurrent_requests_match_their_target_only_output(models):
    """Batching across callers changes no token."""
    import asyncio

    async with spec_stack(models / TINY_TARGET, models / TINY_DRAFT) as (verify, draft):
        async with AsyncSpecMeshClient(verify, draft, str(models / TINY_TARGET)) as client:
            prompts = [PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)) for i in range(16)]
            solo = [await client.generate(p, 24, speculate=False, ignore_eos=True)
                    for p in prompts]
            together = await asyncio.gather(*(
                client.generate(p, 24, tree=("chain:4" if i % 2 else "dynamic:12"),
                                adaptive=False, ignore_eos=True)
                for i, p in enumerate(prompts)))
            stubs = client._loop.stubs  # every round of every request rode one stream each
            assert (stubs.propose_call.num_opened, stubs.verify_call.num_opened) == (1, 1)
            assert stubs.propose_call.streaming and stubs.verify_call.streaming
    assert [r.token_ids for r in together] == [r.token_ids for r in solo]


async def test_adaptive_speculation_keeps_the_output(models, hf_reference):
    """Adaptive budgets change how much is drafted per round, never which tokens come out."""
    async with spec_stack(models / TINY_TARGET, models / TINY_DRAFT) as (verify, draft):
        async with AsyncSpecMeshClient(verify, draft, str(models / TINY_TARGET)) as client:
            for prompt in PROMPTS[:2]:
                out = await client.generate(prompt, 40, tree="chain:6", adaptive=True,
                                            ignore_eos=True)
                assert out.token_ids == hf_reference[prompt]
                assert out.stats.num_rounds < 40  # it did speculate


async def test_default_requests_size_their_tree_adaptively(models, hf_reference, monkeypatch):
    """No `adaptive` given: greedy and unseeded sampling run adaptively, seeded sampling
    keeps its fixed tree (reproducible); the greedy output is still the target's."""
    from specmesh.clients.batch_loop import BatchLoop

    seen = []
    submit = BatchLoop.submit

    def spy(self, request, adaptive=False):
        seen.append(adaptive)
        return submit(self, request, adaptive)

    monkeypatch.setattr(BatchLoop, "submit", spy)
    async with spec_stack(models / TINY_TARGET, models / TINY_DRAFT) as (verify, draft):
        async with AsyncSpecMeshClient(verify, draft, str(models / TINY_TARGET)) as client:
            out = await client.generate(PROMPTS[0], 40, ignore_eos=True)
            await client.generate(PROMPTS[0], 8, temperature=0.8)
            await client.generate(PROMPTS[0], 8, temperature=0.8, seed=3)
            await client.generate(PROMPTS[0], 8, adaptive=False)
    assert out.token_ids == hf_reference[PROMPTS[0]]
    assert seen == [True, True, False, False]
