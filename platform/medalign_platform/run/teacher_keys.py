"""Teacher keys remembered beside the target cache, so a process can read cached targets
without loading the teacher.

A teacher's cache key (:class:`~medalign_platform.run.evaluation.TeacherKey`) is a
fingerprint of its weights, so computing it means loading the teacher (for a large teacher,
seconds and gigabytes of memory), paid by the driver and again by every trial
process and Ray Train worker, although the driver has already filled the cache. The key is
therefore recorded once in ``<cache_dir>/teacher_keys.json`` under a signature of what it was
computed from: the teacher's name, the size and modification time of each of its local files,
the target-definition versions and the versions of the libraries that build the teacher.
Any change to those gives a new signature, and the teacher is loaded again.

Only teachers made of local files are recorded (``local-dir:PATH``, ``hf-clip:PATH`` of a
folder, a config name with a ``pretrained`` file); hub ids and open_clip tags are always
loaded. A lookup that misses the cache still loads the teacher and checks its fingerprint
against the key (``TargetLookup.teacher``).
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import metadata
from pathlib import Path

from ..common.atomic import write_json_atomic

KEYS_FILE = "teacher_keys.json"
_LIBRARIES = ("torch", "open_clip_torch", "transformers")


def teacher_files(name: str | None, pretrained: str | None) -> list[Path] | None:
    """The local files the teacher is built from, or None when it is not (only) local files."""
    from ..core.teacher import HF_CLIP_PREFIX, LOCAL_DIR_PREFIX

    for prefix in (LOCAL_DIR_PREFIX, HF_CLIP_PREFIX):
        if (name or "").startswith(prefix):
            root = Path(name[len(prefix):]).expanduser()
            return sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else None
    if name and pretrained and os.path.isfile(pretrained):
        return [Path(pretrained)]
    return None


def signature(name: str | None, pretrained: str | None, factory: str | None = None) -> str | None:
    """sha256 over what the key was computed from (module docstring); None when not recordable.

    ``factory`` (``teacher.factory``, a teacher built in code from the files) is part of it,
    so a different builder over the same files never reuses the other's key.
    """
    from ..core.teacher import _PROMPT_AWARE_VERSION, _TARGETS_VERSION

    files = teacher_files(name, pretrained)
    if not files:
        return None
    head = f"{name}|{pretrained}" + (f"|factory={factory}" if factory else "")   # unchanged without a factory
    parts = [head, _TARGETS_VERSION, _PROMPT_AWARE_VERSION]
    for library in _LIBRARIES:
        try:
            parts.append(f"{library}=={metadata.version(library)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{library} absent")
    for path in files:
        stat = path.stat()
        parts.append(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _read(cache_dir: str | os.PathLike) -> dict:
    try:
        keys = json.loads((Path(cache_dir) / KEYS_FILE).read_text())
    except (OSError, ValueError):  # none yet, or unreadable: the teacher is loaded instead
        return {}
    return keys if isinstance(keys, dict) else {}


def remembered_key(cache_dir: str | os.PathLike, sig: str | None) -> dict | None:
    """The key fields (``identity``, ``grid``, ``width``, ``prompt_identity``) recorded under the
    teacher's :func:`signature`, or None."""
    entry = _read(cache_dir).get(sig) if sig else None
    return entry if isinstance(entry, dict) and {"identity", "grid", "width"} <= entry.keys() else None


def remember_key(cache_dir: str | os.PathLike, sig: str | None, fields: dict) -> None:
    """Records ``fields`` (the key just computed by loading the teacher) under its :func:`signature`.

    Written atomically; two processes recording at once may keep only one entry, which costs
    the other teacher a load later, never a wrong key.
    """
    if not sig:
        return
    keys = _read(cache_dir)
    if keys.get(sig) == fields:
        return
    keys[sig] = fields
    try:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(cache_dir) / KEYS_FILE, keys)
    except OSError:  # a read-only cache: every process keeps loading the teacher, as before
        pass
