"""Stop strings cut exactly and identically in every mode; the context window is a finish."""

from __future__ import annotations

import pytest

from specmesh.clients.async_client import AsyncSpecMeshClient
from specmesh.clients.stops import find_stop, first_stop, visible_text
from specmesh.clients.types import GenerationParams
from specmesh.wire.tree_spec import TreeSpec
from tests.conftest import TINY_DRAFT, TINY_TARGET
from tests.stack import spec_stack


def decode(ids: list[int]) -> str:
    return "".join(chr(ord("a") + i) for i in ids)


def test_find_stop_takes_the_earliest_then_longest():
    assert find_stop("the park", ["park", "he"]) == (1, "he")
    assert find_stop("abcd", ["bc", "bcd"]) == (1, "bcd")
    assert find_stop("abcd", ["x"]) is None


def test_first_stop_is_the_first_token_completing_it():
    # before "ab", new tokens c, d, e: "abcd" holds "cd" first after two new tokens
    assert first_stop(decode, [0, 1], [2, 3, 4], ["cd"]) == (2, "cd")
    assert first_stop(decode, [0, 1], [2, 3, 4], ["bc"]) == (1, "bc")  # spans the boundary
    assert first_stop(decode, [0, 1], [2, 3, 4], ["zz"]) is None
    assert first_stop(decode, [0], [1], []) is None


def test_visible_text_holds_back_a_possible_stop():
    assert visible_text("once upon a ti", ["time"], finished=False) == "once upon a "
    assert visible_text("once upon a ti", ["time"], finished=True) == "once upon a ti"
    assert visible_text("once upon a time!", ["time"], finished=False) == "once upon a "
    assert visible_text("abc", ["xyz"], finished=False) == "abc"


MODES = {"target-only": dict(speculate=False), "chain:4": dict(tree=TreeSpec.parse("chain:4")),
         "dynamic:8": dict(tree=TreeSpec.parse("dynamic:8"))}


@pytest.mark.models
async def test_stop_strings_cut_identically_in_every_mode(models):
    prompt = "Once upon a time"
    async with spec_stack(models / TINY_TARGET, models / TINY_DRAFT) as (verify, draft), \
            AsyncSpecMeshClient(verify, draft, str(models / TINY_TARGET)) as client:
        full = await client.generate(prompt, params=GenerationParams(
            max_new_tokens=40, speculate=False))
        assert "park" in full.text or "Lily" in full.text
        stop = "park" if "park" in full.text else "Lily"
        results = {}
        for name, kw in MODES.items():
            params = GenerationParams(max_new_tokens=40, stop=(stop,), **kw)
            streamed = ""
            async for ev in client.stream(prompt, params=params):
                streamed += ev.text
                res = ev.result or None
            results[name] = res
            assert res.finish_reason == "stop" and res.matched_stop == stop
            assert res.text == full.text[:full.text.index(stop)] == streamed
        ids = {name: r.token_ids for name, r in results.items()}
        assert len(set(map(tuple, ids.values()))) == 1, ids


@pytest.mark.models
async def test_context_window_ends_with_length_and_params_are_honoured(models):
    async with spec_stack(models / TINY_TARGET, models / TINY_DRAFT) as (verify, draft), \
            AsyncSpecMeshClient(verify, draft) as client:
        prompt = [1] + [403] * 20
        for kw in MODES.values():
            res = await client.generate(prompt, params=GenerationParams(
                max_new_tokens=600, ignore_eos=True, **kw))
            assert res.finish_reason == "length"
            assert len(prompt) + len(res.token_ids) == client.max_context
        # params' own max_new_tokens is used when none is passed positionally
        res = await client.generate(prompt, params=GenerationParams(max_new_tokens=20,
                                                                    ignore_eos=True))
        assert len(res.token_ids) == 20

