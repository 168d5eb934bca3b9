"""The platform's error types: each one is printed by the CLI as one line naming the fix.

Every error a user can cause by what they type or point at (a config value, a file, a
dataset record, a search-space entry) derives from :class:`MedAlignError`, so the CLI can
print its message without a traceback and exit with status 2.
"""

from __future__ import annotations


class MedAlignError(Exception):
    """Base class of errors caused by input; the message says what is wrong and how to fix it."""


class ConfigError(MedAlignError, ValueError):
    """A config value, override or path is wrong; the message names the key and the fix."""
