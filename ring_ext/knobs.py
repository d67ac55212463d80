"""Typed knobs: one validation for every plugin's config dataclass, naming each knob as the user writes it.

A field's annotation says what a value may be (`int`, `float`, `bool`, `str`, `Literal[...]`, `X | None`), and
`knob(default, ge=..., gt=...)` adds a bound. A config calls `check_knobs(self, "trainer.v1.c3po")` in its
`__post_init__` and `from_mapping(cls, values, section)` builds it from a user's mapping, refusing unknown keys.
Errors read `trainer.v1.c3po.pool_prompts must be an integer >= 1, got 0`. No verl import.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, Union

T = TypeVar("T")
_MISSING: Any = dataclasses.MISSING


def knob(default: Any = _MISSING, *, ge: float | None = None, gt: float | None = None) -> Any:
    """A dataclass field with bounds (inclusive `ge`, exclusive `gt`); no default makes it required."""
    return dataclasses.field(default=default, metadata={"ge": ge, "gt": gt})


def _kind(hint: Any) -> tuple[str, tuple[Any, ...]]:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        kind, extra = _kind(args[0])
        return kind, (*extra, None)  # None allowed
    if origin is Literal:
        return "literal", typing.get_args(hint)
    return {int: "int", float: "float", bool: "bool", str: "str"}.get(hint, "any"), ()


def _type_error(value: Any, kind: str, choices: tuple[Any, ...]) -> str | None:
    if value is None:
        return None if None in choices else "a value"
    if kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
        return "an integer"
    if kind == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))):
        return "a number"
    if kind == "float" and not math.isfinite(value):
        return "a finite number"
    if kind == "bool" and not isinstance(value, bool):
        return "true or false"
    if kind == "str" and not isinstance(value, str):
        return "a string"
    if kind == "literal" and value not in choices:
        return f"one of {tuple(c for c in choices if c is not None)}"
    return None


def check_knobs(config: Any, section: str, prefix: str = "") -> None:
    """Check every field of the dataclass instance `config` against its annotation and bounds; errors name the
    knob `<section>.<prefix><field>`."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        kind, choices = _kind(hints[f.name])
        ge, gt = f.metadata.get("ge"), f.metadata.get("gt")
        noun = {"int": "an integer", "float": "a number"}.get(kind, "")
        bound = f" >= {ge}" if ge is not None else f" > {gt}" if gt is not None else ""
        wrong = _type_error(value, kind, choices)
        if wrong is None and value is not None and ((ge is not None and value < ge) or
                                                    (gt is not None and value <= gt)):
            wrong = noun  # the right type, out of bounds
        if wrong is not None:
            need = f"{wrong}{bound if wrong == noun else ''}"
            raise ValueError(f"{section}.{prefix}{f.name} must be {need}, got {value!r}")


def from_mapping(cls: type[T], values: Mapping[str, Any], section: str) -> T:
    """`cls(**values)`, refusing keys `cls` does not have and naming missing required ones."""
    known = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown {section} key(s) {unknown}; known: {sorted(known)}")
    required = [f.name for f in dataclasses.fields(cls)  # type: ignore[arg-type]
                if f.default is _MISSING and f.default_factory is _MISSING and values.get(f.name) is None]
    if required:
        raise ValueError(f"{section}: {', '.join(required)} required")
    return cls(**dict(values))
