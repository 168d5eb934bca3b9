"""Cached build stages: build once into a fingerprinted folder, reuse while the recipe holds.

A stage lives in ``<root>/<name>-<fingerprint>/``; the fingerprint hashes the stage's
recipe (everything its output depends on), so a changed recipe builds a new folder and an
unchanged one is never rebuilt. A stage is written into a hidden temporary sibling and
renamed into place only when complete, so an interrupted build leaves nothing half-built.
Used by ``medalign prepare`` for SynthMed and for the real-data adapters.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

DEFAULT_CACHE_ENV = "MEDALIGN_CACHE"


def default_cache_dir() -> Path:
    """``$MEDALIGN_CACHE`` if set, else ``~/.cache/medalign``."""
    return Path(os.environ.get(DEFAULT_CACHE_ENV) or Path.home() / ".cache" / "medalign")


def fingerprint(payload: dict) -> str:
    """16 hex digits of the SHA-256 of ``payload`` as sorted-key JSON."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def stage_dir(root: Path, name: str, recipe: dict) -> Path:
    """Where the stage ``name`` built from ``recipe`` lives (whether built yet or not)."""
    return Path(root) / f"{name}-{fingerprint(recipe)}"


def read_stage(root: Path, name: str, recipe: dict) -> tuple[Path, dict] | None:
    """``(dir, info)`` of a complete stage built from exactly ``recipe``, else ``None``."""
    target = stage_dir(root, name, recipe)
    record = target / "stage.json"
    if record.is_file():
        try:
            info = json.loads(record.read_text())
        except ValueError:
            return None
        if info.get("recipe") == recipe:
            return target, info
    return None


def cached_stage(root: Path, name: str, recipe: dict, build: Callable[[Path], dict],
                 force: bool = False) -> tuple[Path, dict]:
    """Returns ``(dir, info)`` of a stage, building it only if no complete copy exists (or ``force``).

    Args:
        root: the cache directory of this dataset.
        name: stage name (``data``, ``teacher``, ``student``).
        recipe: everything the stage's output depends on (versions, params, inputs).
        build: writes the stage into the given (temporary) directory and returns a JSON-able
            summary (metrics, timings) stored in ``stage.json``.
        force: build again even if a complete copy exists; it is replaced only once the new
            build is complete.
    """
    found = None if force else read_stage(root, name, recipe)
    if found is not None:
        return found
    target = stage_dir(root, name, recipe)
    tmp = Path(root) / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    started = time.perf_counter()
    try:
        summary = build(tmp)
        info = {"recipe": recipe, "summary": summary, "seconds": round(time.perf_counter() - started, 1)}
        (tmp / "stage.json").write_text(json.dumps(info, indent=2, sort_keys=True))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target, info


def cache_path(sub: str) -> str:
    """``${medalign_cache:SUB}`` in configs: ``$MEDALIGN_CACHE/SUB`` (e.g. the shared teacher-target cache)."""
    return str(default_cache_dir() / str(sub))
