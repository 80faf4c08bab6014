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
