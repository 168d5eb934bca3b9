"""A miniature prepared SynthMed (small data, tiny random models) for run/sweep tests.

The real ``medalign prepare`` trains its models for minutes; pipeline tests only need
the same files in the same places: :func:`medalign_platform.synthmed.prepare.prepare_mini_synthmed`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def mini_synthmed_env(cache_dir: Path, **env: str) -> Iterator[dict]:
    """Prepares a mini SynthMed in ``cache_dir`` and sets ``MEDALIGN_CACHE`` (and ``env``) for the block.

    On exit, Ray is shut down (a run or sweep in the block started it) and the environment
    is restored. Yields the ``prepared.json`` record.
    """
    import ray
    from medalign_platform.synthmed.prepare import prepare_mini_synthmed

    record = prepare_mini_synthmed(cache_dir)
    patch = pytest.MonkeyPatch()
    patch.setenv("MEDALIGN_CACHE", str(cache_dir))
    for key, value in env.items():
        patch.setenv(key, value)
    try:
        yield record
    finally:
        ray.shutdown()
        patch.undo()
