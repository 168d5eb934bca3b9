"""Atomic builds: write beside the target, then swap it into place.

A build that dies half-way leaves only a hidden temporary sibling, never a half-written
target, and a rebuild only ever replaces a directory that an earlier build of the same
kind wrote (recognised by its marker JSON file). Single files (records, tables, plots
that a running sweep's readers may open at any moment) go through :func:`replaced_atomically`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def replaced_atomically(path: Path) -> Iterator[Path]:
    """Yields a hidden temporary sibling of ``path`` to write; renames it onto ``path`` when the
    block ends without an error (and removes it otherwise)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> Path:
    """Writes ``text`` to ``path`` so that readers see the old file or the whole new one."""
    with replaced_atomically(path) as tmp:
        tmp.write_text(text)
    return path


def replaceable(path: Path, marker_file: str, name: str) -> bool:
    """True if ``path`` is absent-or-empty, or holds a ``marker_file`` whose ``name`` is ``name``."""
    if not path.is_dir():
        return False
    if not any(path.iterdir()):
        return True
    try:
        return json.loads((path / marker_file).read_text()).get("name") == name
    except (OSError, ValueError, AttributeError):
        return False


def move_into_place(tmp: Path, out_dir: Path) -> None:
    """Renames the finished ``tmp`` build to ``out_dir``, replacing an earlier build."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json_atomic(path: Path, data, *, indent: int = 1) -> Path:
    """Writes ``data`` as JSON (sorted keys) so that readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, json.dumps(data, indent=indent, sort_keys=True))
