"""The gateway's model registry: file loading, validation (errors name the field), routing."""

from __future__ import annotations

import dataclasses
import pathlib
import re

import pytest

from specmesh.clients.registry import ConfigError, ModelEntry, Registry, Router
from specmesh.clients.scheduler import SchedulerConfig
from specmesh.clients.types import DEFAULT_TREE, MAX_NEW_TOKENS_LIMIT
from specmesh.errors import UnknownModel
from specmesh.wire.tree_spec import TreeSpec

TOML = """
[[models]]
name = "tiny"
version = 1
verify = "127.0.0.1:50051"
draft = "127.0.0.1:50052"
cache = "127.0.0.1:50053"
tokenizer = "/models/tiny"
tree = "static:4,2"
adaptive = true
default = true
weight = 90
max_new_tokens = 512
[models.limits]
max_running = 32

[[models]]
name = "tiny"
version = "2"
verify = "h1:50051,h2:50051"
weight = 10

[[models]]
name = "big"
version = "a"
verify = "dns:///verify.svc:50051"
"""

YAML = """
models:
  - name: tiny
    version: 1
    verify: 127.0.0.1:50051
    draft: 127.0.0.1:50052
    cache: 127.0.0.1:50053
    tokenizer: /models/tiny
    tree: static:4,2
    adaptive: true
    default: true
    weight: 90
    max_new_tokens: 512
    limits: {max_running: 32}
  - {name: tiny, version: "2", verify: "h1:50051,h2:50051", weight: 10}
  - {name: big, version: a, verify: "dns:///verify.svc:50051"}
"""


def entry(**kw) -> dict:
    return {"name": "tiny", "version": "1", "verify": "127.0.0.1:50051", **kw}


def registry(*entries: dict) -> Registry:
    return Registry.from_mapping({"models": list(entries)})


def test_toml_and_yaml_load_to_equal_registries(tmp_path):
    (tmp_path / "m.toml").write_text(TOML)
    (tmp_path / "m.yaml").write_text(YAML)
    (tmp_path / "m.yml").write_text(YAML)
    reg = Registry.load(tmp_path / "m.toml")
    assert reg == Registry.load(str(tmp_path / "m.yaml")) == Registry.load(tmp_path / "m.yml")
    first = reg.entries[0]
    assert first == ModelEntry(
        name="tiny", version="1", verify="127.0.0.1:50051", draft="127.0.0.1:50052",
        cache="127.0.0.1:50053", tokenizer="/models/tiny", tree=TreeSpec.parse("static:4,2"),
        adaptive=True, default=True, weight=90, max_new_tokens=512,
        scheduler=SchedulerConfig(max_running=32))
    assert reg.keys() == ["tiny@1", "tiny@2", "big@a"]
    assert reg.names() == ["tiny", "big"]
    assert [e.key for e in reg.versions("tiny")] == ["tiny@1", "tiny@2"]
    assert reg.default_entry is first


def test_defaults_of_an_entry():
    e = registry(entry()).entries[0]
    assert (e.draft, e.cache, e.tokenizer) == (None, None, None)
    assert e.tree == DEFAULT_TREE and not e.adaptive and not e.default and e.weight == 0
    assert e.max_new_tokens == MAX_NEW_TOKENS_LIMIT and e.scheduler == SchedulerConfig()
    assert e.key == "tiny@1"


@pytest.mark.parametrize("models, field", [
    ([{"version": "1", "verify": "h:1"}], "models[0].name"),
    ([entry(), {"name": "x", "version": "1"}], "models[1].verify"),
    ([entry(version=None)], "models[0].version"),
    ([entry(name="")], "models[0].name"),
    ([entry(name="a b")], "models[0].name"),
    ([entry(name="a@b")], "models[0].name"),
    ([entry(version="1@2")], "models[0].version"),
    ([entry(verify="nohost")], "models[0].verify"),
    ([entry(draft="h:99999")], "models[0].draft"),
    ([entry(tree="chain:x")], "models[0].tree"),
    ([entry(tree="chain:99")], "models[0].tree.chain_length"),
    ([entry(tree=4)], "models[0].tree"),
    ([entry(weight=-1)], "models[0].weight"),
    ([entry(weight=True)], "models[0].weight"),
    ([entry(adaptive="yes")], "models[0].adaptive"),
    ([entry(colour="red")], "models[0].colour"),
    ([entry(), entry(version="2", default=True), entry(version=2)], "models[2].version"),
    ([entry(default=True), entry(version="2", default=True)], "models[1].default"),
    ([entry(limits={"max_runing": 3})], "models[0].limits.max_runing"),
    ([entry(limits={"max_running": 0})], "models[0].limits.max_running"),
    ([entry(limits={"max_running": "8"})], "models[0].limits.max_running"),
    ([entry(limits=[1])], "models[0].limits"),
    ([entry(max_new_tokens=0)], "models[0].max_new_tokens"),
    ([entry(max_new_tokens=5000)], "models[0].max_new_tokens"),
    ([entry(name="x"), entry(), entry(version="2")], "models[1].default"),
    ([], "models"),
    (["tiny"], "models[0]"),
])
def test_every_validation_error_names_its_field(models, field):
    with pytest.raises(ConfigError) as err:
        registry(*models)
    assert err.value.field == field
    assert str(err.value).startswith(f"{field}: ")
    assert isinstance(err.value, ValueError)


NESTED = "interactive" in {f.name for f in dataclasses.fields(SchedulerConfig)}


@pytest.mark.skipif(not NESTED, reason="SchedulerConfig has no per-class limits")
def test_nested_limit_tables(tmp_path):
    (tmp_path / "m.toml").write_text(TOML + "[models.limits.interactive]\nmax_running = 8\n")
    got = Registry.load(tmp_path / "m.toml").entries[2].scheduler
    assert got == SchedulerConfig(interactive={"max_running": 8})
    for limits, field in (({"interactive": {"max_runing": 1}}, "interactive.max_runing"),
                          ({"batch": {"max_queued": 0}}, "batch.max_queued"),
                          ({"batch": 3}, "batch")):
        with pytest.raises(ConfigError) as err:
            registry(entry(limits=limits))
        assert err.value.field == f"models[0].limits.{field}"


def test_ambiguous_versions_message():
    with pytest.raises(ConfigError, match=r"^models\[0\]\.default: several versions of 'tiny' "
                                          "and none is the default or weighted$"):
        registry(entry(), entry(version="2"))


def test_file_level_errors_name_the_file_or_key(tmp_path):
    with pytest.raises(ConfigError) as err:
        Registry.from_mapping({"models": [entry()], "gateway": {}})
    assert err.value.field == "gateway"
    with pytest.raises(ConfigError) as err:
        Registry.from_mapping({})
    assert err.value.field == "models"
    for name, text in (("m.json", "{}"), ("missing.toml", None), ("bad.toml", "[[models"),
                       ("bad.yaml", "models: [")):
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        with pytest.raises(ConfigError) as err:
            Registry.load(path)
        assert err.value.field == str(path)


def test_chain_0_means_no_speculation():
    assert registry(entry(tree="chain:0")).entries[0].tree == TreeSpec()


def test_single_validates_like_a_file():
    e = ModelEntry("tiny", "1", "127.0.0.1:50051")
    reg = Registry.single(e)
    assert reg.entries == (e,) and reg.default_entry is e
    with pytest.raises(ConfigError, match="^weight: "):
        ModelEntry("tiny", "1", "127.0.0.1:50051", weight=-1)


def test_resolve_empty_pinned_default_and_single_version():
    reg = registry(entry(name="a"), entry(), entry(version="2", default=True))
    router = Router(reg)
    assert router.resolve("") is reg.entries[2]  # the first default entry
    assert router.resolve("tiny@1") is reg.entries[1]
    assert router.resolve("tiny@2") is reg.entries[2]
    assert {router.resolve("tiny").key for _ in range(5)} == {"tiny@2"}
    assert router.resolve("a") is reg.entries[0]
    assert Router(registry(entry(name="a"), entry())).resolve("").key == "a@1"  # no default


def test_weights_90_10_are_exact_and_spread_out():
    router = Router(registry(entry(weight=90), entry(version="2", weight=10)))
    picks = "".join(router.resolve("tiny").version for _ in range(200))
    assert picks.count("1") == 180 and picks.count("2") == 20
    light = [i for i, v in enumerate(picks) if v == "2"]
    assert light == list(range(5, 200, 10))  # one in every 10, evenly spaced
    assert max(len(run) for run in re.findall("1+", picks)) == 9


def test_weights_1_1_2_and_unweighted_versions_skipped():
    router = Router(registry(entry(weight=1), entry(version="2", weight=1),
                             entry(version="3", weight=2), entry(version="4", default=True)))
    picks = [router.resolve("tiny").version for _ in range(12)]
    assert picks == ["3", "1", "2", "3"] * 3
    assert router.resolve("tiny@4").version == "4"  # pinning still reaches it


@pytest.mark.parametrize("model", ["nope", "tiny@9", "nope@1", " ", "tiny ", "@", "tiny@"])
def test_unknown_model(model):
    with pytest.raises(UnknownModel) as err:
        Router(registry(entry())).resolve(model)
    assert repr(model) in str(err.value) and "tiny@1" in str(err.value)
    assert err.value.code == "NOT_FOUND" and err.value.field == "model"


def test_connection_shared_across_trees_not_across_services():
    reg = registry(entry(tree="chain:2", default=True), entry(version="2", tree="dynamic:16"),
                   entry(version="3", cache="127.0.0.1:50053"))
    one, two, three = reg.entries
    assert one.connection() == two.connection()
    assert one.connection() != three.connection()
    hash(one.connection())


def test_the_readme_example_loads(tmp_path):
    """README's registry example is a valid file (kept true as the keys change)."""
    readme = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = "# models.toml" + readme.split("```toml\n# models.toml", 1)[1].split("```", 1)[0]
    path = tmp_path / "models.toml"
    path.write_text(block)
    reg = Registry.load(path)
    assert reg.keys() == ["stories@2", "stories@3"]
    assert [e.weight for e in reg.entries] == [90, 10]
    assert reg.entries[1].scheduler.batch.max_queued == 256
    assert reg.entries[1].scheduler.max_running == 32
