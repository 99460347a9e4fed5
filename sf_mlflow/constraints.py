"""One constraint table for settings: a dataclass field carries its type, default and range.

The config sections (:mod:`sf_mlflow.config`) and the estimator's settings
(:mod:`sf_mlflow.models.settings`) declare their fields with :func:`param`, so a
setting is named, typed, bounded and defaulted once, and the same checks serve a YAML
file, a ``-P`` override and a keyword argument of ``PNMF``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import re
import types
import typing
from dataclasses import field
from typing import Any, Literal, Mapping, Union

from sf_mlflow.errors import ConfigError

__all__ = ["param", "coerce", "check_range", "describe", "Invalid", "checked_fields", "Duration",
           "parse_duration"]


class Duration(float):
    """The type of a length of time, such as ``training.time_budget``: written as a number of
    seconds or with units (``90s``, ``20m``, ``1.5h``, ``1h30m``); checked values are plain
    floats in seconds (:func:`parse_duration`)."""


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([smhd])\s*", re.IGNORECASE)


def parse_duration(value: Any) -> float:
    """Seconds in ``value`` (a number, or a string like ``"20m"`` or ``"1h30m"``); raise
    Invalid when it is neither."""
    if isinstance(value, bool):
        raise Invalid(describe(Duration))
    if isinstance(value, numbers.Real):
        out = float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            out = float(text)
        except ValueError:
            parts = _DURATION.findall(text)
            if not parts or "".join(f"{n}{u}" for n, u in parts) != re.sub(r"\s+", "", text):
                raise Invalid(describe(Duration)) from None
            out = sum(float(n) * _UNITS[u.lower()] for n, u in parts)
    else:
        raise Invalid(describe(Duration))
    if not math.isfinite(out):
        raise Invalid(describe(Duration))
    return out

def _range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
           hi_open: bool = False, doc: str = "") -> dict:
    return {"lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open, "doc": doc}


def param(default: Any, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
       hi_open: bool = False, doc: str = "", omit_unset: bool = False, unhashed: bool = False) -> Any:
    """A dataclass field with a default, an optional numeric range and a description.

    ``omit_unset``: a setting added after runs were hashed, whose default keeps the old
    behaviour; while it has its default it is left out of the config's flat view, so the
    stage hashes, params and study names of configs that do not set it stay what they were.

    ``unhashed``: a setting that changes how a result is computed but not the result (e.g.
    how many processes share a fit); it is left out of the config's hashes, and out of its
    flat view (params, study names) while it has its default.
    """
    meta = _range(lo, hi, lo_open=lo_open, hi_open=hi_open, doc=doc)
    if unhashed:
        meta["unhashed"] = True
    if omit_unset:
        meta["omit_unset"] = True
    if isinstance(default, (dict, list)) or dataclasses.is_dataclass(default):
        raise TypeError("use field(default_factory=...) for mutable defaults")
    return field(default=default, metadata=meta)


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NONE = {"null", "none", "~", ""}


def describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        return " or ".join(describe(a) for a in args) + (" or null" if optional else "")
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            list: "a list", Duration: "a duration such as 90s, 20m, 1.5h or 1h30m (a bare number: "
                                      "seconds)"}.get(
        tp, getattr(tp, "__name__", str(tp)))


class Invalid(Exception):
    def __init__(self, expected: str):
        self.expected = expected


def coerce(value: Any, tp: Any, strict: bool = False) -> Any:
    """Convert ``value`` to type ``tp`` or raise Invalid with what was expected.

    ``strict`` (estimator arguments) takes numbers and booleans only as such, while
    config values may also be strings (``"1e-3"``, ``"true"``: YAML and ``-P`` give strings).
    """
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and not strict and value.strip().lower() in _NONE):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        for a in inner:
            try:
                return coerce(value, a, strict)
            except Invalid:
                pass
        raise Invalid(describe(tp))
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        if isinstance(value, str):
            low = {str(c).lower(): c for c in choices}
            if value.lower() in low:
                return low[value.lower()]
        hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        raise Invalid(describe(tp) + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    if tp is Duration:
        return parse_duration(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and not strict and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise Invalid("true or false")
    if tp is int:
        if isinstance(value, bool):
            raise Invalid("an integer")
        if isinstance(value, numbers.Integral):   # numpy integers too
            return int(value)
        if isinstance(value, float) and value.is_integer() and not strict:
            return int(value)
        if isinstance(value, str) and not strict:
            try:
                f = float(value.strip())
            except ValueError:
                raise Invalid("an integer") from None
            if f.is_integer():
                return int(f)
        raise Invalid("an integer")
    if tp is float:
        if isinstance(value, bool):
            raise Invalid("a number")
        if isinstance(value, numbers.Real):
            out = float(value)
        elif isinstance(value, str) and not strict:
            try:
                out = float(value.strip())
            except ValueError:
                raise Invalid("a number") from None
        else:
            raise Invalid("a number")
        if not math.isfinite(out):
            raise Invalid("a finite number")
        return out
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise Invalid("a string")
    if tp is list:
        if isinstance(value, (list, tuple)) and all(
                v is None or isinstance(v, (bool, int, float, str)) for v in value):
            return list(value)
        raise Invalid("a list of plain values, e.g. [1, 2, 3]")
    raise TypeError(f"unsupported config type {tp!r}")


def check_range(value: Any, meta: Mapping[str, Any]) -> str | None:
    if value is None or isinstance(value, (bool, str)):
        return None
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and (value <= lo if meta.get("lo_open") else value < lo):
        return f"a value {'>' if meta.get('lo_open') else '>='} {lo:g}"
    if hi is not None and (value >= hi if meta.get("hi_open") else value > hi):
        return f"a value {'<' if meta.get('hi_open') else '<='} {hi:g}"
    return None

def checked_fields(obj: Any, owner: str) -> dict[str, Any]:
    """Every field of the dataclass ``obj``, type-checked (strictly) and range-checked.

    Returns the normalised values (e.g. ``"adam"`` -> ``"Adam"``, an int for a float
    field -> float). Raises ConfigError naming ``owner``, the field, the value and what
    is expected.
    """
    hints = typing.get_type_hints(type(obj))
    out = {}
    for f in dataclasses.fields(obj):
        if f.metadata.get("internal"):
            continue
        value = getattr(obj, f.name)
        try:
            coerced = coerce(value, hints[f.name], strict=True)
        except Invalid as e:
            raise ConfigError(f"{owner}: {f.name} = {value!r} is invalid: expected {e.expected}") from None
        problem = check_range(coerced, f.metadata)
        if problem:
            raise ConfigError(f"{owner}: {f.name} = {value!r} is out of range: expected {problem}")
        out[f.name] = coerced
    return out
