"""Typed dataclass configs from nested dicts (YAML) with dotted command-line overrides.

The generic half of ``fipo_megatron.config``: it knows nothing about FIPO. A config is a tree of frozen
dataclasses; ``build_dataclass(cls, mapping, prefix=...)`` checks every key and type against the
dataclass's annotations and raises ``ValueError`` naming the full dotted field (``actor.lr``) for an
unknown key, a wrong type (a string for an int) or a value the dataclass's ``__post_init__`` rejects.

    overrides = parse_overrides(["actor.ppo_mini_batch_size=64", "rollout.top_p=0.7"])
    merged = merge_nested(yaml.safe_load(text), overrides)

Override values are parsed as YAML scalars (``1e-6`` is a float, ``true`` a bool, ``[1, 2]`` a list).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, Literal, Union

import yaml

_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict:
    """``["a.b=1", "a.c=x"]`` -> ``{"a": {"b": 1, "c": "x"}}`` (values parsed as YAML scalars)."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form dotted.key=value")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-")
        if not key or any(not part for part in key.split(".")):
            raise ValueError(f"override {item!r} has an empty key")
        # yaml.safe_load would turn '' into None; an explicit empty string is more useful.
        value = yaml.safe_load(raw) if raw.strip() else ""
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads "1e-6" (no dot) as a string
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r} conflicts with an earlier override of {part!r}")
        node[parts[-1]] = value
    return out


def merge_nested(base: dict, update: dict) -> dict:
    """Deep-merge ``update`` into a copy of ``base`` (dicts merge, everything else replaces)."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_nested(out[key], value)
        else:
            out[key] = value
    return out


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce_value(tp: Any, value: Any, field_path: str) -> Any:
    """Check ``value`` against annotation ``tp``; return it converted where lossless (int -> float,
    list -> tuple). Raise ValueError naming ``field_path`` otherwise."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ValueError(f"{field_path}: must not be null (expected {_type_name(tp)})")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce_value(arg, value, field_path)
            except ValueError as exc:
                errors.append(str(exc))
        if len(errors) == 1:
            # Optional[X]: X's own message names the bad nested field (``a.b.c: ...``); keep it.
            raise ValueError(errors[0])
        raise ValueError(f"{field_path}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ValueError(f"{field_path}: must be one of {list(choices)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{field_path}: expected a mapping for {tp.__name__}, got {type(value).__name__} {value!r}")
        return build_dataclass(tp, value, prefix=field_path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{field_path}: expected a list, got {type(value).__name__} {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            item_tp = args[0]
        elif origin is tuple and args:
            if len(args) != len(value):
                raise ValueError(f"{field_path}: expected {len(args)} items, got {len(value)}")
            return tuple(coerce_value(a, v, f"{field_path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        else:
            item_tp = args[0] if args else Any
        items = [coerce_value(item_tp, v, f"{field_path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{field_path}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{field_path}: expected a bool (true/false), got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{field_path}: expected an int, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML 1.1 reads "1e-6" (no dot) as a string; accept it when it is a valid float literal.
            if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
                return float(value)
            raise ValueError(f"{field_path}: expected a float, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{field_path}: expected a string, got {type(value).__name__} {value!r}")
        return value
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ValueError(f"{field_path}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _field_error(exc: Exception, cls: type, prefix: str) -> ValueError:
    """Re-word a ``__post_init__`` error so that it names the full dotted field."""
    msg = str(exc)
    names = sorted((f.name for f in dataclasses.fields(cls)), key=len, reverse=True)
    hit = next((n for n in names if re.search(rf"(?<![A-Za-z0-9_]){re.escape(n)}(?![A-Za-z0-9_])", msg)), None)
    where = f"{prefix}.{hit}" if prefix and hit else (prefix or cls.__name__)
    return ValueError(f"{where}: {msg}")


def build_dataclass(cls: type, mapping: dict, *, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``mapping``, validating keys and types (errors name ``prefix.key``)."""
    if not isinstance(mapping, dict):
        raise ValueError(f"{prefix or cls.__name__}: expected a mapping, got {type(mapping).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(mapping) - set(fields))
    if unknown:
        where = ", ".join(f"{prefix}.{k}" if prefix else k for k in unknown)
        raise ValueError(f"unknown config key(s): {where}; valid keys of {prefix or cls.__name__}: {sorted(fields)}")
    kwargs = {}
    for name, value in mapping.items():
        path = f"{prefix}.{name}" if prefix else name
        kwargs[name] = coerce_value(hints[name], value, path)
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise _field_error(exc, cls, prefix) from exc
    except TypeError as exc:  # a required field is missing
        raise ValueError(f"{prefix or cls.__name__}: {exc}") from exc


def to_plain(obj: Any) -> Any:
    """Dataclasses -> dicts, tuples -> lists: something ``yaml.safe_dump`` writes and reads back."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    return obj
