"""Flat config keys: one spelling (``section.key``) and one flattener for the whole platform.

Configs are nested dicts (``{"distill": {"layer": 2}}``). Overrides, search spaces, sweep
records and leaderboards name a value by its flat key, ``"distill.layer"``. Two places
need another separator and convert at their boundary only: Ray Tune / Optuna name the
parameters of a nested param space ``"distill/layer"`` (:func:`tune_key`), and TensorBoard's
HParams use ``/`` as well (``flatten(config, sep="/")``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping
from typing import Any

SEP = "."


def flatten(tree: Mapping, sep: str = SEP, *, leaf: Callable[[Any], Any] | None = None,
            prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": 2}`` -> ``{"a.b": 1, "c": 2}``; dicts are walked, anything else is a leaf.

    Args:
        tree: a nested mapping.
        sep: the separator between path parts.
        leaf: optional conversion of each leaf value (e.g. to a TensorBoard-friendly type).
        prefix: prepended to every key (internal; ``"a."``).
    """
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, sep, leaf=leaf, prefix=f"{name}{sep}"))
        else:
            flat[name] = leaf(value) if leaf is not None else value
    return flat


def unflatten(flat: Mapping[str, Any], sep: str = SEP) -> dict:
    """The inverse of :func:`flatten`: ``{"a.b": 1}`` -> ``{"a": {"b": 1}}``."""
    tree: dict = {}
    for key, value in flat.items():
        set_flat(tree, key, value, create=True, sep=sep)
    return tree


def iter_keys(tree: Mapping, prefix: str = "") -> Iterator[str]:
    """Every flat key of ``tree`` (leaves only), in insertion order."""
    yield from (f"{prefix}{key}" for key in flatten(tree))


def get_flat(tree: Mapping, key: str, sep: str = SEP) -> Any:
    """``tree["a"]["b"]`` for ``key="a.b"``; raises ``KeyError(key)`` when a part is missing."""
    node: Any = tree
    for part in key.split(sep):
        if not isinstance(node, Mapping) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def has_flat(tree: Mapping, key: str, sep: str = SEP) -> bool:
    """Whether :func:`get_flat` finds ``key``."""
    try:
        get_flat(tree, key, sep)
    except KeyError:
        return False
    return True


def set_flat(tree: dict, key: str, value: Any, *, create: bool = False, sep: str = SEP) -> None:
    """Sets ``tree["a"]["b"] = value`` for ``key="a.b"`` in place.

    Args:
        create: make missing parent sections; otherwise a missing parent is a ``KeyError``.
    """
    *parents, last = key.split(sep)
    node = tree
    for part in parents:
        if part not in node and create:
            node[part] = {}
        node = node[part]
    node[last] = value


def with_values(tree: Mapping, values: Mapping[str, Any]) -> dict:
    """A deep copy of ``tree`` with the flat ``{"a.b": value}`` entries set."""
    out = copy.deepcopy(dict(tree))
    for key, value in values.items():
        set_flat(out, key, value)
    return out


def tune_key(key: str) -> str:
    """The name Ray Tune and Optuna give a searched key: ``"distill.layer"`` -> ``"distill/layer"``."""
    return key.replace(SEP, "/")


def from_tune_key(name: str) -> str:
    """The flat config key of a Tune/Optuna parameter name: ``"distill/layer"`` -> ``"distill.layer"``."""
    return name.replace("/", SEP)
