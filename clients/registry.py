"""The gateway's model registry: which models (and versions) it serves, and where each lives.

One gateway serves several models, and several versions of one model, read from a TOML or YAML
file (pure: no gRPC, no torch). TOML shape:

    [[models]]
    name = "tiny"                     # required: non-empty, no "@", no whitespace
    version = "1"                     # required: a string (an int is taken as its str), no "@"
    verify = "127.0.0.1:50051"        # required: verify address ("h:p", "h1:p,h2:p", "dns:///n:p")
    draft = "127.0.0.1:50052"         # optional: draft address; absent = target-only
    cache = "127.0.0.1:50053"         # optional: cache service address
    tokenizer = "/path/to/model-dir"  # optional: folder with tokenizer.json, or a .gguf file
    tree = "chain:4"                  # optional default tree spec (TreeSpec.parse), "chain:4"
    adaptive = false                  # optional: adaptive tree size by default (absent: on
                                      #   for chains, except for seeded sampling)
    default = true                    # optional: the version `name` alone picks without weights
    weight = 90                       # optional int >= 0 (0): traffic share among the versions
                                      #   of `name` when a request names `name` alone
    max_new_tokens = 512              # optional per-request cap in [1, 4096] (4096)
    [models.limits]                   # optional: SchedulerConfig keyword arguments
    max_running = 32                  #   (its nested limits are tables too, e.g.
                                      #   [models.limits.interactive])

YAML has the same structure (`models:` a list of mappings). Every error is a ConfigError whose
message starts with the field path (`models[1].tree: ...`), so a bad file is fixed in one look.

A request's `model` resolves (Router.resolve) as: "" -> the default entry; "name@version" -> that
entry; "name" -> smooth weighted round-robin over its weighted versions, else its default (or
only) version. Registry is immutable data; Router holds the round-robin state.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from specmesh.clients.scheduler import SchedulerConfig
from specmesh.clients.types import DEFAULT_TREE, MAX_NEW_TOKENS_LIMIT
from specmesh.errors import InvalidRequest, UnknownModel
from specmesh.wire.tree_spec import TreeSpec

_ADDRESSES = ("verify", "draft", "cache")
_KEYS = ("name", "version", "verify", "draft", "cache", "tokenizer", "tree", "adaptive",
         "default", "weight", "max_new_tokens", "limits")


class ConfigError(ValueError):
    """A bad registry file or entry; `field` is the path of the offending field."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


def _check_address(field: str, address: str) -> None:
    """Refuse an address that is not 'host:port', 'h1:p,h2:p' or 'dns:///name:port'."""
    parts = [p.strip() for p in address.split(",") if p.strip()]
    if not parts:
        raise ConfigError(field, "empty address")
    for part in parts:
        host, _, port = part.removeprefix("dns:///").rpartition(":")
        if (not host or not port.isdigit() or not 1 <= int(port) <= 65535
                or any(c.isspace() for c in part)):
            raise ConfigError(field, f"bad address {part!r}: use host:port, h1:p,h2:p or "
                              "dns:///name:port")


@dataclass(frozen=True)
class ModelEntry:
    """One servable model version and the services behind it (self-validating)."""

    name: str
    version: str
    verify: str
    draft: str | None = None  # None: target-only decoding (or n-gram trees)
    cache: str | None = None
    tokenizer: str | None = None
    tree: TreeSpec = DEFAULT_TREE
    adaptive: bool | None = None  # None: GenerationParams' auto (adaptive_on)
    default: bool = False
    weight: int = 0
    max_new_tokens: int = MAX_NEW_TOKENS_LIMIT
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self):
        """Raise ConfigError naming the field (relative to the entry) when a value is bad."""
        for name, text in (("name", self.name), ("version", self.version)):
            if not text or "@" in text or any(c.isspace() for c in text):
                raise ConfigError(name, f"{text!r} must be non-empty, without '@' or whitespace")
        for name in _ADDRESSES:
            if getattr(self, name) is not None:
                _check_address(name, getattr(self, name))
        if self.tokenizer is not None and not self.tokenizer:
            raise ConfigError("tokenizer", "empty path")
        if self.weight < 0:
            raise ConfigError("weight", f"{self.weight} must be >= 0")
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
            raise ConfigError("max_new_tokens",
                              f"{self.max_new_tokens} not in [1, {MAX_NEW_TOKENS_LIMIT}]")
        try:
            self.tree.validate("tree")
        except InvalidRequest as e:
            raise ConfigError(e.field, e.problem) from None

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"

    def connection(self) -> tuple:
        """What must be equal for two entries to share one connected client."""
        return (self.verify, self.draft, self.cache, self.tokenizer, self.scheduler)


def _typed(path: str, value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    """`value` if it is a `kind` (a bool is never taken for an int), else ConfigError."""
    if isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
        return value
    raise ConfigError(path, f"{value!r} must be {what}")


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def _limits(path: str, raw: Any, cls: type = SchedulerConfig) -> Any:
    """cls(**raw) (SchedulerConfig, and its nested limit tables such as `interactive`), with
    errors naming `path` or `path.<key>`."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if not isinstance(raw, Mapping):
        raise ConfigError(path, f"must be a table of {', '.join(fields)}")
    kw: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(f"{path}.{key}", f"unknown key (known: {', '.join(fields)})")
        default = _field_default(fields[key])
        if dataclasses.is_dataclass(default):
            value = _limits(f"{path}.{key}", value, type(default))
        elif isinstance(default, int):
            _typed(f"{path}.{key}", value, type(default), f"a {type(default).__name__}")
        kw[key] = value
    try:
        return cls(**kw)
    except (TypeError, ValueError) as e:
        key, sep, problem = str(e).partition(": ")
        if sep and key in fields:
            raise ConfigError(f"{path}.{key}", problem) from None
        raise ConfigError(path, str(e)) from None


def _entry(path: str, raw: Any) -> ModelEntry:
    """One `[[models]]` table -> ModelEntry (errors name `path.<key>`)."""
    if not isinstance(raw, Mapping):
        raise ConfigError(path, "must be a table (mapping)")
    for key in raw:
        if key not in _KEYS:
            raise ConfigError(f"{path}.{key}", f"unknown key (known: {', '.join(_KEYS)})")
    for key in ("name", "version", "verify"):
        if key not in raw:
            raise ConfigError(f"{path}.{key}", "required")
    kw: dict[str, Any] = {"name": _typed(f"{path}.name", raw["name"], str, "a string"),
                          "version": str(_typed(f"{path}.version", raw["version"], (str, int),
                                                "a string"))}
    for key in ("verify", "draft", "cache", "tokenizer"):
        if key in raw:
            kw[key] = _typed(f"{path}.{key}", raw[key], str, "a string")
    if "tree" in raw:
        try:
            kw["tree"] = TreeSpec.parse(_typed(f"{path}.tree", raw["tree"], str, "a string"))
        except ValueError as e:
            raise ConfigError(f"{path}.tree", str(e)) from None
    for key in ("adaptive", "default"):
        if key in raw:
            kw[key] = _typed(f"{path}.{key}", raw[key], bool, "true or false")
    for key in ("weight", "max_new_tokens"):
        if key in raw:
            kw[key] = _typed(f"{path}.{key}", raw[key], int, "an integer")
    if "limits" in raw:
        kw["scheduler"] = _limits(f"{path}.limits", raw["limits"])
    try:
        return ModelEntry(**kw)
    except ConfigError as e:
        raise ConfigError(f"{path}.{e.field}", e.problem) from None


def _parse(path: str, suffix: str, text: str) -> Any:
    """TOML (stdlib) or YAML (PyYAML, imported only when needed) text -> data."""
    if suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(path, f"cannot parse: {e}") from None
    import yaml
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(path, f"cannot parse: {e}") from None


@dataclass(frozen=True)
class Registry:
    """The models a gateway serves, in file order (self-validating across entries)."""

    entries: tuple[ModelEntry, ...]

    def __post_init__(self):
        """Refuse no models, duplicate keys, two defaults, and versions `name` cannot pick."""
        object.__setattr__(self, "entries", tuple(self.entries))
        if not self.entries:
            raise ConfigError("models", "at least one model is required")
        keys: dict[str, int] = {}
        defaults: dict[str, int] = {}
        for i, e in enumerate(self.entries):
            if e.key in keys:
                raise ConfigError(f"models[{i}].version", f"duplicate model {e.key!r} "
                                  f"(also models[{keys[e.key]}])")
            keys[e.key] = i
            if e.default and e.name in defaults:
                raise ConfigError(f"models[{i}].default", f"{e.name!r} already has a default "
                                  f"version (models[{defaults[e.name]}])")
            if e.default:
                defaults[e.name] = i
        for name in self.names():
            versions = self.versions(name)
            if len(versions) > 1 and name not in defaults and not any(v.weight for v in versions):
                raise ConfigError(f"models[{self.entries.index(versions[0])}].default",
                                  f"several versions of {name!r} and none is the default "
                                  "or weighted")

    @classmethod
    def from_mapping(cls, data: Any) -> Registry:
        """Validate a parsed file (`{"models": [...]}`) into a Registry."""
        if not isinstance(data, Mapping):
            raise ConfigError("models", "the file must be a mapping with a `models` list")
        for key in data:
            if key != "models":
                raise ConfigError(str(key), "unknown key (known: models)")
        models = data.get("models")
        if not isinstance(models, list) or not models:
            raise ConfigError("models", "a non-empty list of model tables is required")
        return cls(tuple(_entry(f"models[{i}]", raw) for i, raw in enumerate(models)))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Registry:
        """Read a `.toml`, `.yaml` or `.yml` file (ConfigError naming the path if unreadable)."""
        p = pathlib.Path(path)
        suffix = p.suffix.lower()
        if suffix not in (".toml", ".yaml", ".yml"):
            raise ConfigError(str(p), f"unknown suffix {p.suffix!r}: use .toml, .yaml or .yml")
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(str(p), f"cannot read: {e}") from None
        return cls.from_mapping(_parse(str(p), suffix, text))

    @classmethod
    def single(cls, entry: ModelEntry) -> Registry:
        """A registry of one entry (a gateway configured by flags)."""
        return cls((entry,))

    @property
    def default_entry(self) -> ModelEntry:
        """What a request with an empty model gets: the first default entry, else the first."""
        return next((e for e in self.entries if e.default), self.entries[0])

    def versions(self, name: str) -> list[ModelEntry]:
        return [e for e in self.entries if e.name == name]

    def keys(self) -> list[str]:
        return [e.key for e in self.entries]

    def names(self) -> list[str]:
        return list(dict.fromkeys(e.name for e in self.entries))


class Router:
    """Resolves a request's `model` to an entry; spreads `name` over weighted versions.

    Weighted picks use smooth weighted round-robin (nginx): each pick adds every candidate's
    weight to its `current`, takes the largest (ties: file order) and subtracts the total from
    it. Deterministic, exact over a full cycle, and the light versions are spread out.
    """

    def __init__(self, registry: Registry):
        self.registry = registry
        self._by_key = {e.key: e for e in registry.entries}
        self._current: dict[str, list[int]] = {}  # name -> current of each weighted version
        self._lock = threading.Lock()

    def resolve(self, model: str) -> ModelEntry:
        """The entry serving `model` (UnknownModel, code NOT_FOUND, if none does)."""
        if model == "":
            return self.registry.default_entry
        if "@" in model:
            entry = self._by_key.get(model)
            if entry is None:
                raise UnknownModel(model, self.registry.keys())
            return entry
        versions = self.registry.versions(model)
        if not versions:
            raise UnknownModel(model, self.registry.keys())
        weighted = [v for v in versions if v.weight > 0]
        if weighted:
            return self._pick(model, weighted)
        if len(versions) == 1:
            return versions[0]
        return next(v for v in versions if v.default)  # Registry guarantees one

    def _pick(self, name: str, candidates: list[ModelEntry]) -> ModelEntry:
        """One smooth weighted round-robin pick among `candidates` (file order breaks ties)."""
        total = sum(c.weight for c in candidates)
        with self._lock:
            current = self._current.setdefault(name, [0] * len(candidates))
            for i, c in enumerate(candidates):
                current[i] += c.weight
            best = max(range(len(candidates)), key=lambda i: (current[i], -i))
            current[best] -= total
        return candidates[best]
