"""YAML files plus ``a.b=c`` overrides into nested, typed, kw-only config dataclasses.

Unknown keys, wrong types and bad values are reported with the dotted field name, before
any process group exists. Field documentation is the docstring written under each field;
:func:`field_docs` reads it back for ``--help``-style listings.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

MOVED_FIELDS = {"data.eval_paths": "eval.datasets"}
"""Fields that were removed, and the field that took their place (for the error)."""

_YAML12_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"rollout.temperature=0.7"`` -> (["rollout", "temperature"], 0.7) (YAML value)."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like section.field=value")
    key, raw = text.split("=", 1)
    path = [part for part in key.strip().split(".") if part]
    if not path:
        raise ValueError(f"override {text!r} has an empty field name")
    return path, yaml.safe_load(raw) if raw.strip() else None


def merge_overrides(mapping: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=c`` overrides to a nested mapping (copy)."""
    result = _deep_copy(mapping)
    for text in overrides:
        path, value = parse_override(text)
        node = result
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {text!r}: {part!r} is a value, not a section")
        node[path[-1]] = value
    return result


def _deep_copy(mapping: dict) -> dict:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in mapping.items()}


def build_config(cls: type[T], mapping: dict | None, prefix: str = "") -> T:
    """Instantiate dataclass ``cls`` from a nested mapping, checking names and types."""
    mapping = dict(mapping or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(mapping) - set(fields))
    for name in unknown:
        if prefix + name in MOVED_FIELDS:
            raise ValueError(
                f"{prefix + name} is no longer a config field; use {MOVED_FIELDS[prefix + name]}"
            )
    if unknown:
        where = prefix.rstrip(".") or cls.__name__
        raise ValueError(
            f"unknown config field(s) {', '.join(prefix + u for u in unknown)} in {where}; "
            f"valid fields: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in mapping.items():
        kwargs[name] = _coerce(hints[name], value, prefix + name)
    try:
        return cls(**kwargs)
    except ValueError as err:
        if prefix and not str(err).startswith(prefix.rstrip(".")):
            raise ValueError(f"{prefix.rstrip('.')}: {err}") from None
        raise


def _coerce(hint: Any, value: Any, name: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, name)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0] if errors else f"{name}: invalid value {value!r}")
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be a section (mapping), got {value!r}")
        return build_config(hint, value, prefix=name + ".")
    if origin is typing.Literal:
        if value not in typing.get_args(hint):
            raise ValueError(f"{name} must be one of {list(typing.get_args(hint))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name} must be a list, got {value!r}")
        args = typing.get_args(hint)
        item = args[0] if args else Any
        items = [_coerce(item, v, f"{name}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str) and _YAML12_FLOAT.fullmatch(value.strip()):
            # PyYAML (YAML 1.1) reads ``1e-6`` (no dot) as a string; YAML 1.2 and users
            # mean a number.
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {value!r}")
        return value
    return value


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] = ()) -> T:
    """Read a YAML file (optional), apply overrides, and build ``cls``."""
    mapping: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {path} does not exist; pass --config <file.yaml>")
        try:
            mapping = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"config file {path} is not valid YAML: {err}") from None
        if not isinstance(mapping, dict):
            raise ValueError(f"config file {path} must hold a mapping of sections")
    return build_config(cls, merge_overrides(mapping, list(overrides)))


def config_to_dict(config: Any) -> dict:
    """Plain nested dict of a config dataclass (for logging and checkpoints)."""
    return dataclasses.asdict(config)


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of dataclass ``cls``."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = ast.parse(source).body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs
