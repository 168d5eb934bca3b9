"""A run's checkpoints: adapter, steer weights, optimiser, schedule, RNG and trainer state; no pickle.

``adapter/`` loads with ``peft.PeftModel.from_pretrained``; ``steer.safetensors`` holds the
steer weights; ``optimizer.pt`` / ``scheduler.pt`` are state dicts of tensors and numbers
that ``torch.load(weights_only=True)`` accepts; RNG states go to ``rng.safetensors`` and
``trainer_state.json``.

A checkpoint is never half there. :func:`save_checkpoint` writes into a hidden temporary
sibling folder, fsyncs every file, writes ``manifest.json`` (the size and SHA-256 of every
file) and renames the folder into place. Copies made later (Ray Train and Tune persist the
folder file by file into the run's storage) carry the manifest, and :func:`verify_checkpoint`
checks it on every load: a folder that a full disk or a kill left half-written, or that a
resumed trial half-overwrote, fails the check. :func:`load_checkpoint` refuses such a folder;
:func:`latest_checkpoint` (resume, ``medalign export``) skips it with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import uuid
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..common.errors import MedAlignError

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"      # {"format": 2, "files": {relative path: {"size", "sha256", "mtime_ns"}}}
MANIFEST_FORMAT = 2
_REQUIRED = ("adapter/adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng.safetensors", TRAINER_STATE)


class CheckpointError(MedAlignError, RuntimeError):
    """A checkpoint folder is incomplete or corrupt; the message names the file."""


class IncompleteCheckpointWarning(UserWarning):
    """A half-written or corrupt checkpoint was skipped."""


def unwrap(model):
    """The peft model under an optional DistributedDataParallel wrapper."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def save_checkpoint(directory: Path, model, steer, optimizer, scheduler, state: dict) -> Path:
    """Writes everything a resumed run needs into ``directory``, atomically, and returns it.

    The files go to a temporary sibling folder first; only a complete, fsynced, sealed
    folder is renamed to ``directory`` (an earlier folder of that name is replaced). A
    failure (a full disk) removes the temporary folder and raises.

    Args:
        model: the peft student (DDP-wrapped or not).
        steer: the steer adapter or None.
        state: trainer state (``step``, ``evaluations``); RNG states are added.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _write_files(tmp, model, steer, optimizer, scheduler, state)
        seal_checkpoint(tmp)
        if directory.exists():
            old = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(directory, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, directory)
        _fsync_dir(directory.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _write_files(directory: Path, model, steer, optimizer, scheduler, state: dict) -> None:
    unwrap(model).save_pretrained(directory / "adapter")
    if steer is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in steer.state_dict().items()},
                  directory / "steer.safetensors")
    torch.save(optimizer.state_dict(), directory / "optimizer.pt")
    torch.save(scheduler.state_dict(), directory / "scheduler.pt")
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, directory / "rng.safetensors")
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    state = {
        **state,
        "python_rng": [python_state[0], list(python_state[1]), python_state[2]],
        "numpy_rng": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
    }
    (directory / TRAINER_STATE).write_text(json.dumps(state, indent=1))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        _fsync_file(path)
    except OSError:  # some filesystems do not fsync directories; the files themselves are synced
        pass


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def seal_checkpoint(directory: Path) -> Path:
    """(Re)writes ``manifest.json``: size and SHA-256 of every file in the folder, each fsynced.

    Called after files are added to a checkpoint (predictions, Tune's metrics) and before it
    is persisted. Files whose size and modification time match the current manifest keep
    their recorded hash (no second read of a large optimiser state).
    """
    directory = Path(directory)
    try:
        previous = json.loads((directory / MANIFEST).read_text()).get("files", {})
    except (OSError, ValueError, AttributeError):
        previous = {}
    files = {}
    for path in _files(directory):
        name = path.relative_to(directory).as_posix()
        stat = path.stat()
        entry = previous.get(name) if isinstance(previous, dict) else None
        if not (isinstance(entry, dict) and entry.get("size") == stat.st_size
                and entry.get("mtime_ns") == stat.st_mtime_ns and entry.get("sha256")):
            _fsync_file(path)
            entry = {"size": stat.st_size, "sha256": _sha256(path), "mtime_ns": stat.st_mtime_ns}
        files[name] = entry
    tmp = directory / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"format": MANIFEST_FORMAT, "files": files}, indent=1, sort_keys=True))
    _fsync_file(tmp)
    os.replace(tmp, directory / MANIFEST)
    for folder in {directory, *(p.parent for p in _files(directory))}:
        _fsync_dir(folder)
    return directory


def verify_checkpoint(directory: Path) -> None:
    """Checks a checkpoint folder against its manifest (every file there, same size, same SHA-256).

    A folder without a manifest (written before checksums existed) passes when every file a
    resume needs is there, non-empty, and the trainer state parses.

    Raises:
        CheckpointError: naming the folder and the first file that is missing or differs.
    """
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        for name in _REQUIRED:
            path = directory / name
            if not path.is_file() or path.stat().st_size == 0:
                raise CheckpointError(f"checkpoint {directory} is incomplete: {name} is missing or empty")
        _trainer_state(directory)
        return
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
            raise ValueError("unknown manifest format")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"checkpoint {directory} has an unreadable {MANIFEST} ({error})") from None
    for name, entry in files.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {directory} is incomplete: {name} is missing")
        size = path.stat().st_size
        if size != entry.get("size"):
            raise CheckpointError(f"checkpoint {directory} is incomplete: {name} has {size} bytes, "
                                  f"the manifest says {entry.get('size')}")
        if _sha256(path) != entry.get("sha256"):
            raise CheckpointError(f"checkpoint {directory} is corrupt: {name} does not match its SHA-256")
    missing = [name for name in _REQUIRED if name not in files]
    if missing:
        raise CheckpointError(f"checkpoint {directory} lacks {missing}")


def _trainer_state(directory: Path) -> dict:
    try:
        state = json.loads((Path(directory) / TRAINER_STATE).read_text())
        int(state["step"])
        return state
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"checkpoint {directory}: {TRAINER_STATE} is unreadable ({error})") from None


def load_checkpoint(directory: Path, model, steer, optimizer, scheduler) -> dict:
    """Restores everything :func:`save_checkpoint` wrote, after verifying it; returns the trainer state.

    Raises:
        CheckpointError: the folder is incomplete or corrupt.
    """
    from peft import set_peft_model_state_dict

    directory = Path(directory)
    verify_checkpoint(directory)
    weights = load_file(directory / "adapter" / "adapter_model.safetensors")
    set_peft_model_state_dict(unwrap(model), weights)
    if steer is not None:
        steer.load_state_dict(load_file(directory / "steer.safetensors"))
    optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(directory / "scheduler.pt", weights_only=True))
    rng = load_file(directory / "rng.safetensors")
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    state = _trainer_state(directory)
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy_rng"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    return state


def checkpoint_step(folder: Path | None) -> int:
    """The step a checkpoint folder was written at (-1 when it has no readable trainer state)."""
    if folder is None:
        return -1
    try:
        return int(json.loads((Path(folder) / TRAINER_STATE).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def complete_checkpoints(root: str | Path, pattern: str = f"**/{TRAINER_STATE}") -> list[tuple[int, Path]]:
    """``(step, folder)`` of every checkpoint under ``root`` that passes :func:`verify_checkpoint`.

    Folders that fail are skipped with an :class:`IncompleteCheckpointWarning` naming the problem.
    ``pattern`` globs the trainer-state files (default: anywhere below ``root``).
    """
    root = Path(root)
    found = []
    folders = {p.parent for p in root.glob(pattern)} if pattern.endswith(TRAINER_STATE) else \
        {p for p in root.glob(pattern) if p.is_dir()}
    for folder in sorted(folders):
        if any(part.startswith(".") for part in folder.relative_to(root).parts):
            continue  # a save in progress, or run state set aside (a restarted trial's old checkpoints)
        try:
            verify_checkpoint(folder)
        except CheckpointError as error:
            message = f"skipped: {error}"
            logger.warning(message)
            warnings.warn(message, IncompleteCheckpointWarning, stacklevel=2)
            continue
        found.append((checkpoint_step(folder), folder))
    return found


def latest_checkpoint(run_dir: str | Path) -> Path:
    """The complete checkpoint with the highest step anywhere under a run directory.

    Incomplete or corrupt ones are skipped with a warning.

    Raises:
        FileNotFoundError: no complete checkpoint there.
    """
    found = [pair for pair in complete_checkpoints(run_dir) if pair[0] >= 0]
    if not found:
        raise FileNotFoundError(f"no complete checkpoint ({TRAINER_STATE} and verified files) under {run_dir}; "
                                "is it a `medalign train` run dir?")
    return max(found, key=lambda pair: pair[0])[1]
