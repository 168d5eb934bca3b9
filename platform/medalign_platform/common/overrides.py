"""The one override parser of every ``medalign`` subcommand.

``medalign sweep experiment=synthmed_vqa trainer.max_steps=50 sweep.num_samples=8`` hands
each subcommand a list of ``key=value`` texts. They are parsed once, here, with Hydra's own
override grammar, so a value means the same thing whether it ends up in the composed run
config (Hydra reads the same texts) or in a subcommand's own settings: ``50`` is an int,
``2.5e-4`` a float, ``true`` a bool, ``null`` None, ``[1,2]`` a list, ``{CPU: 1}`` a dict,
and ``off`` stays the string ``"off"``.

A subcommand keeps the overrides it owns (``sweep.*``, ``search=``, ``layers=``, ``top=``...)
with :func:`split_overrides` and passes the rest to the config composer unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError
from .keys import set_flat


@dataclass(frozen=True)
class Override:
    """One parsed ``key=value``.

    Attributes:
        key: the flat key, e.g. ``"trainer.max_steps"`` (Hydra's ``+``/``++``/``~`` prefix removed).
        value: the typed value (None for a ``~key`` deletion).
        text: the override as typed, what the config composer receives.
        delete: ``~key`` (Hydra deletion).
    """

    key: str
    value: Any
    text: str
    delete: bool = False


def _parser():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()


def parse_overrides(texts: Sequence[str]) -> list[Override]:
    """Parses ``key=value`` texts with Hydra's grammar.

    Raises:
        ConfigError: naming the first malformed override and the expected form.
    """
    from hydra.errors import HydraException

    texts = list(texts)
    parser = _parser() if texts else None
    parsed = []
    for text in texts:
        if not isinstance(text, str) or ("=" not in text and not text.startswith("~")) or text.startswith("="):
            raise ConfigError(f"override {text!r} is not key=value; write e.g. trainer.max_steps=50 "
                              "(quote values with spaces: 'run.name=\"my run\"')")
        try:
            (override,) = parser.parse_overrides([text])
        except HydraException as error:
            first = str(error).splitlines()[0]
            raise ConfigError(f"cannot parse override {text!r} ({first}); write key=value, e.g. "
                              "trainer.max_steps=50, layers=[1,2,3], sweep.trial_resources={CPU: 1}") from None
        parsed.append(Override(key=override.key_or_group, value=None if override.is_delete() else override.value(),
                               text=text, delete=override.is_delete()))
    return parsed


def split_overrides(overrides: Iterable[Override], owned: Callable[[str], bool]) -> tuple[list[Override], list[Override]]:
    """``(the overrides whose key ``owned(key)`` accepts, the others)``, each in the given order."""
    mine, rest = [], []
    for override in overrides:
        (mine if owned(override.key) else rest).append(override)
    return mine, rest


def as_tree(overrides: Iterable[Override], strip: str = "") -> dict:
    """Nested dict of the overrides' values: ``[a.b=1, c=x]`` -> ``{"a": {"b": 1}, "c": "x"}``.

    Args:
        strip: a key prefix to drop first (``"sweep."`` turns ``sweep.asha.enabled`` into
            ``{"asha": {"enabled": ...}}``).

    Raises:
        ConfigError: a key is given both as a value and as a section (``a=1 a.b=2``).
    """
    tree: dict = {}
    for override in overrides:
        key = override.key[len(strip):] if strip and override.key.startswith(strip) else override.key
        try:
            set_flat(tree, key, override.value, create=True)
        except (TypeError, KeyError):
            raise ConfigError(f"override {override.text!r}: {key.rsplit('.', 1)[0]} was given a value and also "
                              "keys of its own; give one or the other") from None
    return tree


def texts(overrides: Iterable[Override]) -> list[str]:
    """The overrides as typed (what Hydra's compose takes)."""
    return [override.text for override in overrides]
