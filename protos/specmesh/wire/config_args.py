"""Command-line flags built from a config dataclass: each default and help text written once.

    @dataclass(frozen=True)
    class Config:
        port: int = 0
        \"\"\"gRPC port; 0 picks a free one.\"\"\"

    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, Config)            # --port (int, default 0, the docstring as help)
    config = from_args(Config, parser.parse_args())

A field's flag is its name with dashes; a field that is itself a dataclass contributes its own
fields' flags (flat: `--kv-cache-mb`, not `--engine-kv-cache-mb`); the type comes from the
annotation (`int`, `float`, `str`, `bool`, or one of them `| None`); a bool that defaults to
False is a switch; a field with no default is a required flag. `defaults` overrides a default for one program (the draft service's
smaller KV cache) without writing the field twice.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from collections.abc import Mapping
from typing import Any

_SCALARS = (int, float, str, bool)


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass (attribute docstrings)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _scalar_type(hint: Any) -> type:
    """int for `int` or `int | None`; a TypeError for anything a flag cannot carry."""
    if hint in _SCALARS:
        return hint
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and args[0] in _SCALARS:
            return args[0]
    raise TypeError(f"no command-line form for {hint!r}")


def _flat_fields(cls: type) -> list[tuple[type, dataclasses.Field, Any]]:
    """(owner class, field, type hint) of every scalar field, nested dataclasses flattened."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out += _flat_fields(hint)
        else:
            out.append((cls, f, hint))
    return out


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type,
                       defaults: Mapping[str, Any] | None = None,
                       skip: frozenset[str] = frozenset()) -> None:
    """One flag per field of `cls` (except `skip`), typed, defaulted and documented from it."""
    overrides = dict(defaults or {})
    fields = _flat_fields(cls)
    unknown = set(overrides) - {f.name for _, f, _ in fields}
    if unknown:
        raise ValueError(f"defaults for unknown fields: {sorted(unknown)}")
    for owner, f, hint in fields:
        if f.name not in skip:
            _add_flag(parser, f, _scalar_type(hint), field_docs(owner).get(f.name, ""),
                      overrides)


def _add_flag(parser: argparse.ArgumentParser, f: dataclasses.Field, kind: type, doc: str,
              overrides: Mapping[str, Any]) -> None:
    flag = "--" + f.name.replace("_", "-")
    help_text = doc.replace("%", "%%")
    required = f.default is dataclasses.MISSING and f.name not in overrides
    default = overrides.get(f.name, None if required else f.default)
    if kind is bool and default is False:
        parser.add_argument(flag, action="store_true", help=help_text)
    elif kind is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                            help=help_text)
    elif required:
        parser.add_argument(flag, type=kind, required=True, help=help_text)
    else:
        parser.add_argument(flag, type=kind, default=default,
                            help=f"{help_text} (default: %(default)s)")


def from_args(cls: type, namespace: argparse.Namespace, **extra: Any):
    """`cls` from the parsed flags of its fields, nested dataclasses built from theirs (plus
    `extra` for skipped fields)."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            values[f.name] = from_args(hints[f.name], namespace)
        elif hasattr(namespace, f.name):
            values[f.name] = getattr(namespace, f.name)
    return cls(**values, **extra)
