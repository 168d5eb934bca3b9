"""Typed settings: one dataclass per config section, built from plain dicts in one place.

Every config section (``trainer``, ``distill``, ``sweep``...) is a dataclass deriving from
:class:`Settings`, whose fields carry their default, their help text (as peft's configs do)
and their bounds::

    @dataclass
    class TrainerSettings(Settings):
        section: ClassVar[str] = "trainer"
        max_steps: int = setting(200, "Optimiser steps.", ge=1)

:meth:`Settings.from_dict` is the only way a section is built from a config dict (the
composed YAML, a worker's plain dict, a sweep trial's sampled config): it fills defaults,
rejects unknown keys (suggesting the closest valid one), checks each value against the
field's type (``trainer.max_steps=abc``, ``=20.5`` or ``=true`` name the key and the
expected type) and bounds, then runs the class's own cross-field :meth:`Settings.check`.
Defaults therefore live in exactly one place, the dataclass; YAML presets only set values.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, TypeVar, Union

from .errors import ConfigError

S = TypeVar("S", bound="Settings")
_BOUNDS = {"ge": (">=", lambda v, b: v >= b), "gt": (">", lambda v, b: v > b),
           "le": ("<=", lambda v, b: v <= b), "lt": ("<", lambda v, b: v < b)}


def setting(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = dataclasses.MISSING,
            **bounds: float) -> Any:
    """A settings field: its default (or ``factory`` for mutable ones), help text and bounds.

    Args:
        default: the default value.
        help: one sentence for ``--help`` style listings and docs.
        factory: a callable making the default (lists, dicts, nested settings).
        bounds: ``ge``/``gt``/``le``/``lt`` limits checked by :meth:`Settings.from_dict`.
    """
    unknown = set(bounds) - set(_BOUNDS)
    if unknown:
        raise TypeError(f"unknown bound(s) {sorted(unknown)}; use {sorted(_BOUNDS)}")
    metadata = {"help": help, **bounds}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


class Settings:
    """Base of every typed config section (mix into a ``@dataclass``).

    Construction checks every field, whether the object comes from :meth:`from_dict` or is
    built directly in Python (``LoraSettings(rank=8)``): types, bounds, then :meth:`check`.

    Attributes:
        section: the flat key of the section (``"trainer"``, ``"distill.steer"``), used in messages.
    """

    section: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for field in dataclasses.fields(self):
            key = _name(self.section, field.name)
            value = _coerce(getattr(self, field.name), hints[field.name], key)
            _check_bounds(value, field, key)
            setattr(self, field.name, value)
        self.check()

    @classmethod
    def from_dict(cls: type[S], values: Mapping | None = None) -> S:
        """Builds the section from a plain mapping; missing keys take their defaults.

        Raises:
            ConfigError: an unknown key, a value of the wrong type or out of bounds, or a
                failed cross-field check, naming ``section.key``, the value and the fix.
        """
        section = cls.section or cls.__name__
        if values is None:
            values = {}
        if isinstance(values, cls):
            return values
        if not isinstance(values, Mapping):
            raise ConfigError(f"{section} must be a section of key: value entries, got {values!r}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [key for key in values if key not in names]
        if unknown:
            key = str(unknown[0])
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"did you mean {_name(cls.section, close[0])}? " if close else ""
            where = f"keys in {section}" if cls.section else "options"
            raise ConfigError(f"unknown key {_name(cls.section, key)}; {hint}valid {where}: {sorted(names)}")
        return cls(**values)

    def check(self) -> None:
        """Cross-field checks of a subclass (raise :class:`ConfigError` via :meth:`fail`)."""

    def fail(self, key: str, message: str) -> typing.NoReturn:
        """Raises a ConfigError about ``self.section.key``: ``"<section>.<key> <message>"``."""
        raise ConfigError(f"{_name(self.section, key)} {message}")

    def to_dict(self) -> dict:
        """A plain, JSON-able dict (nested sections become dicts, tuples become lists)."""
        return _plain(dataclasses.asdict(self))

    @classmethod
    def describe(cls, prefix: str = "") -> list[dict]:
        """One row per key (nested sections flattened to ``steer.mode``): ``key``, ``type``,
        ``default`` and ``help``, for docs and listings."""
        hints = _hints(cls)
        rows = []
        for field in dataclasses.fields(cls):
            tp = hints[field.name]
            if isinstance(tp, type) and issubclass(tp, Settings):
                rows += tp.describe(f"{prefix}{field.name}.")
                continue
            if field.default is not dataclasses.MISSING:
                default = field.default
            elif field.default_factory is not dataclasses.MISSING:
                default = field.default_factory()
            else:
                default = None
            rows.append({"key": f"{prefix}{field.name}", "type": _type_name(tp), "default": _plain(default),
                         "help": field.metadata.get("help", "")})
        return rows


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _name(section: str | None, key: str) -> str:
    return f"{section}.{key}" if section else str(key)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(v) if not isinstance(v, str) else v for v in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple, dict):
        args = ", ".join("..." if a is Ellipsis else _type_name(a) for a in typing.get_args(tp))
        return f"{origin.__name__}[{args}]" if args else origin.__name__
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _expected(tp: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    if tp in names:
        return names[tp]
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(tp))
    return _type_name(tp)


def _bad(key: str, value: Any, tp: Any) -> ConfigError:
    hint = ""
    if isinstance(value, bool) and typing.get_origin(tp) is Literal and {"off", "on"} & set(typing.get_args(tp)):
        hint = " (YAML reads unquoted off/on/yes/no as booleans: quote the value, e.g. \"off\")"
    return ConfigError(f"{key} must be {_expected(tp)}, got {value!r} ({type(value).__name__}){hint}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against annotation ``tp`` (ints widen to floats, lists to tuples)."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, key)
            except ConfigError as error:
                errors.append(error)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(f"{key} must be {' or '.join(_expected(a) for a in args)}, got {value!r}")
    if origin is Literal:
        if any(value == choice and type(value) is type(choice) for choice in args):
            return value
        raise _bad(key, value, tp)
    if isinstance(tp, type) and issubclass(tp, Settings):
        if isinstance(value, tp):
            return value
        return tp.from_dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _bad(key, value, tp)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _bad(key, value, tp)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _bad(key, value, tp)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _bad(key, value, tp)
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r} ({type(value).__name__})")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key} must be a list of {len(args)} values, got {value!r}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin or tp) is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a mapping like {{a: 1}}, got {value!r} ({type(value).__name__})")
        key_type, value_type = args if args else (Any, Any)
        return {_coerce(k, key_type, f"{key} key"): _coerce(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _bad(key, value, tp)


def _check_bounds(value: Any, field: dataclasses.Field, key: str) -> None:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    for bound, (symbol, ok) in _BOUNDS.items():
        if bound in field.metadata and not ok(value, field.metadata[bound]):
            limits = ", ".join(f"{_BOUNDS[b][0]} {field.metadata[b]}" for b in _BOUNDS if b in field.metadata)
            raise ConfigError(f"{key} must be {limits}, got {value!r}")
