"""A miniature prepared SynthMed (small data, tiny random models) for run/sweep tests.

The real ``medalign prepare`` trains its models for minutes; pipeline tests only need
the same files in the same places: :func:`medalign_platform.prepare.prepare_mini_synthmed`.
"""

from __future__ import annotations

from pathlib import Path


def build_mini_synthmed(cache_dir: Path, *, n_train: int = 48, n_val: int = 12, n_test: int = 12) -> dict:
    from medalign_platform.prepare import prepare_mini_synthmed

    return prepare_mini_synthmed(cache_dir, n_train=n_train, n_val=n_val, n_test=n_test)
