"""Knobs as data: each setting's default, help text and allowed values are declared once.

A config section is a plain dataclass whose fields are made with :func:`knob`; its
``__post_init__`` calls :func:`check_knobs` with the section's dotted name, so a bad value is a
:class:`ConfigError` naming the key (``optim.lr must be >= 0, got -1.0``) whether the section was
built from YAML, from ``key=value`` overrides or in Python. :func:`build` turns a nested mapping
into sections (unknown keys rejected with a suggestion) and
:func:`load_yaml` reads YAML with duplicate keys and tags rejected, naming the file and line.

This module imports nothing from vopd and no model code: ``vopd config`` stays light.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

__all__ = ["ConfigError", "KnobInfo", "Rule", "build", "check_knobs", "describe", "knob", "load_yaml"]


class ConfigError(ValueError):
    """A configuration key is unknown, has the wrong type or an invalid value (the message names it)."""


@dataclass(frozen=True)
class Rule:
    """The values a knob accepts: a set of choices and/or a numeric range.

    For list-valued knobs the rule applies to every item.
    """

    choices: tuple[str, ...] = ()
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def describe(self) -> str:
        """Human-readable allowed values, e.g. ``in [0, 1)`` or ``topk | full | sampled``."""
        if self.choices:
            return " | ".join(self.choices)
        low = f"[{_num(self.ge)}" if self.ge is not None else f"({_num(self.gt)}" if self.gt is not None else None
        high = f"{_num(self.le)}]" if self.le is not None else f"{_num(self.lt)})" if self.lt is not None else None
        if low and high:
            return f"in {low}, {high}"
        if low:
            return (">= " if self.ge is not None else "> ") + low[1:]
        if high:
            return ("<= " if self.le is not None else "< ") + high[:-1]
        return ""

    def apply(self, key: str, value: Any) -> Any:
        """Return ``value`` or raise :class:`ConfigError`."""
        if self.choices:
            if value not in self.choices:
                raise ConfigError(f"{key}={value!r} is not one of {self.describe()}")
            return value
        if value is None or all(b is None for b in (self.ge, self.gt, self.le, self.lt)):
            return value
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ok = ok and (self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
        ok = ok and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt)
        if not ok:
            raise ConfigError(f"{key} must be a finite number {self.describe()}, got {value!r}")
        return value


def _num(x: float | None) -> str:
    return f"{x:g}"


def knob(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    factory: Any = None,
    choices: tuple[str, ...] = (),
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    """A dataclass field that carries its help text and allowed values (see :class:`Rule`).

    ``factory`` builds a mutable default (a list); ``choices`` make an enum;
    ``ge``/``gt``/``le``/``lt`` bound a number (non-finite values are always refused).
    """
    if not help:
        raise TypeError("every knob needs help text")
    meta = {"help": help, "rule": Rule(tuple(choices), ge, gt, le, lt)}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def check_knobs(section: Any, prefix: str) -> None:
    """Check every knob of a section against its rule; call from the section's ``__post_init__``.

    ``prefix`` is the section's dotted name (``"loss"``; ``""`` for top-level keys).
    """
    hints = _hints(type(section))
    for f in dataclasses.fields(section):
        rule = f.metadata.get("rule")
        if rule is None:
            continue
        key = f"{prefix}.{f.name}" if prefix else f.name
        value = getattr(section, f.name)
        if hints.get(f.name) is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"{key} expects an integer, got {value!r}")  # built in Python, not through build()
        if isinstance(value, (list, tuple)) and not isinstance(value, str):
            items = [rule.apply(f"{key}[{i}]", v) for i, v in enumerate(value)]
            setattr(section, f.name, type(value)(items))
        else:
            setattr(section, f.name, rule.apply(key, value))


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


# ------------------------------------------------------------------------------ YAML reading


class _RawFloat(float):
    """A YAML float that remembers its text, so a string-typed key keeps ``1.50`` as written."""

    raw: str


class _RawInt(int):
    raw: str


class _Loader(yaml.SafeLoader):
    """Safe YAML (no tags executed) that refuses duplicate keys and keeps numbers' source text."""


def _mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    out: dict[Any, Any] = {}
    lines: dict[Any, int] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, typing.Hashable):
            raise yaml.constructor.ConstructorError(None, None, "a key must be a plain value", key_node.start_mark)
        if key in out:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first set on line {lines[key] + 1})", key_node.start_mark
            )
        out[key] = loader.construct_object(value_node, deep=deep)
        lines[key] = key_node.start_mark.line
    return out


def _float(loader: _Loader, node: yaml.ScalarNode) -> float:
    value = _RawFloat(yaml.SafeLoader.construct_yaml_float(loader, node))
    value.raw = str(node.value)
    return value


def _int(loader: _Loader, node: yaml.ScalarNode) -> int:
    value = _RawInt(yaml.SafeLoader.construct_yaml_int(loader, node))
    value.raw = str(node.value)
    return value


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)
_Loader.add_constructor("tag:yaml.org,2002:float", _float)
_Loader.add_constructor("tag:yaml.org,2002:int", _int)


def load_yaml(text: str, source: str) -> Any:
    """Parse YAML ``text``; any error is a :class:`ConfigError` naming ``source`` and the line."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f"{source}, line {mark.line + 1}" if mark is not None else source
        problem = getattr(err, "problem", None) or str(err)
        context = getattr(err, "context", None)
        if "constructor for the tag" in problem:
            tag = problem.rsplit("tag:yaml.org,2002:", 1)[-1].strip("'\"")
            detail = f"the YAML tag !!{tag} is not allowed (plain values, lists and mappings only)"
        else:
            detail = f"{context}: {problem}" if context else problem
        raise ConfigError(f"{where}: {detail}") from None


# ------------------------------------------------------------------------ building sections


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """``value`` as the annotated type ``tp`` (numeric text for numbers, raw text for strings)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin in (list, tuple):
        if isinstance(value, (list, tuple)):
            (inner, *_) = typing.get_args(tp) or (Any,)
            items = [_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
            return tuple(items) if origin is tuple else items
        raise ConfigError(f"{key} expects a list such as [a, b], got {value!r}")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} expects true or false, got {value!r}")
    if tp is float:
        number = _number(value)
        if number is None:
            raise ConfigError(f"{key} expects a number, got {value!r}")
        return float(number)
    if tp is int:
        number = _number(value)
        if isinstance(number, float) and number.is_integer():
            number = int(number)
        if not isinstance(number, int):
            raise ConfigError(f"{key} expects an integer, got {value!r}")
        return int(number)
    if tp is str:
        if isinstance(value, str):
            return str(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return getattr(value, "raw", str(value))  # e.g. a numeric-looking path keeps its text
        raise ConfigError(f"{key} expects a string, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: cannot use {value!r} as {tp}")


def _number(value: Any) -> int | float | None:
    """An int or float from a number or numeric text (YAML 1.1 reads ``1e-5`` as text)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str) and any(c.isdigit() for c in value):
        try:
            return int(value)
        except ValueError:
            pass
        try:
            return float(value)
        except ValueError:
            return None
    return None


def build(cls: type, data: Any, prefix: str = "") -> Any:
    """Build section dataclass ``cls`` from a nested mapping, rejecting unknown keys by name."""
    where = prefix.rstrip(".") or "config"
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} expects a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        key = str(key)
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise ConfigError(f"unknown config key {prefix}{key}{hint}; `vopd config` lists every key")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build(tp, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(f"{prefix}{key}", value, tp)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from err


class KnobInfo(typing.NamedTuple):
    """One row of the knob reference."""

    key: str
    default: str
    allowed: str
    help: str


def describe(cls: type, prefix: str = "") -> list[KnobInfo]:
    """Every knob of section ``cls`` and its subsections, read from the field declarations."""
    rows: list[KnobInfo] = []
    defaults = cls()
    for f in dataclasses.fields(cls):
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            rows.extend(describe(type(value), f"{prefix}{f.name}."))
            continue
        rule = f.metadata.get("rule")
        rows.append(
            KnobInfo(f"{prefix}{f.name}", repr(value), rule.describe() if rule else "", f.metadata.get("help", ""))
        )
    return rows
