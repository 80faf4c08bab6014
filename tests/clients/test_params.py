"""GenerationParams is checked once, where it is built, and honoured as given."""

from __future__ import annotations

import pytest

from specmesh.clients.async_client import _params
from specmesh.clients.types import GenerationParams
from specmesh.errors import InvalidRequest
from specmesh.wire.tree_spec import TreeSpec


@pytest.mark.parametrize("kwargs, field", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(tree=TreeSpec("chain", chain_length=0)), "tree.chain_length"),
])
def test_an_invalid_params_object_cannot_be_built(kwargs, field):
    with pytest.raises(InvalidRequest) as info:
        GenerationParams(**kwargs)
    assert info.value.field == field


def test_params_are_honoured_when_no_positional_max_new_tokens_is_given():
    """The old bug: generate(prompt, params=GenerationParams(max_new_tokens=20)) ran 128."""
    assert _params(GenerationParams(max_new_tokens=20), None, {}).max_new_tokens == 20
    assert _params(GenerationParams(max_new_tokens=20), 7, {}).max_new_tokens == 7
    got = _params(GenerationParams(max_new_tokens=20, temperature=0.5), None,
                  {"tree": "dynamic:8", "stop": ["x"]})
    assert (got.max_new_tokens, got.temperature, str(got.tree), got.stop) == \
        (20, 0.5, "dynamic:8", ("x",))


@pytest.mark.parametrize("kwargs, on", [
    (dict(), True),  # greedy: the output is the target's whatever the tree
    (dict(temperature=0.8), True),  # unseeded sampling: nothing to reproduce
    (dict(temperature=0.8, seed=1), False),  # seeded: the path depends on the tree drafted
    (dict(temperature=0.8, seed=1, adaptive=True), True),
    (dict(adaptive=False), False),
    (dict(tree=TreeSpec.parse("ngram:8")), False),  # bursty acceptance: fixed n-gram trees
    (dict(tree=TreeSpec.parse("ngram:8"), adaptive=True), True),
    (dict(tree=TreeSpec.parse("dynamic:8")), False),  # draft costs are learnt from chains
    (dict(tree=TreeSpec.parse("static:2,2")), False),
    (dict(tree=TreeSpec.parse("chain:3")), True),
    (dict(tree=TreeSpec.parse("dynamic:8"), adaptive=True), True),
])
def test_adaptive_is_on_by_default_except_for_seeded_sampling(kwargs, on):
    assert GenerationParams(**kwargs).adaptive_on is on


@pytest.mark.parametrize("argv, on", [
    ([], True), (["--no-adaptive"], False), (["--adaptive"], True),
    (["--temperature", "0.8", "--seed", "4"], False),
    (["--temperature", "0.8", "--seed", "4", "--adaptive"], True),
])
def test_cli_adaptive_flag_and_its_default(argv, on):
    from specmesh.clients.cli import build_parser, generation_params

    args, _ = build_parser().parse_known_args(["generate", "hi", *argv])
    assert generation_params(args).adaptive_on is on


def test_gateway_request_carries_the_resolved_adaptive_flag():
    """The client sends every field explicitly: auto is resolved before it leaves."""
    from specmesh.clients.gateway_client import generate_request

    assert generate_request("hi", GenerationParams()).adaptive is True
    seeded = generate_request("hi", GenerationParams(temperature=0.5, seed=2))
    assert seeded.HasField("adaptive") and seeded.adaptive is False
