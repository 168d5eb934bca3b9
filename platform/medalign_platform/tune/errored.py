"""What ``resume=true`` does with errored trials, in a local folder or on remote storage.

``Tuner.restore`` decides from the status in Tune's saved experiment state whether a trial
is unfinished (continued), errored (left alone, continued with ``resume_errored`` or started
again with ``restart_errored``) or done. Two things must happen before it reads that state:

* :func:`mark_errored_in_state`: a trial the driver saw error for good (``errored.json``)
  gets the status ERROR, where the last snapshot can still say RUNNING;
* :func:`set_aside_errored_trials` (``sweep.restart_errored=true``): what an errored trial
  left in its folder moves to ``.restarted-<time>/``, or the "restarted" trial would resume
  from its checkpoints (inline) or its run's snapshot (Ray Train). Nothing is deleted.

Both work on ``s3://`` (any pyarrow filesystem) the same way: the multi-node recipe keeps
its experiments there.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

from ..common.atomic import write_text_atomic
from ..run.filesystems import StoragePath
from .layout import read_errored, trial_folder, trial_location
from .result_log import PARAMS_FILE, PROGRESS_FILE, RESULT_FILE

logger = logging.getLogger(__name__)

RESULT_FILES = (RESULT_FILE, PROGRESS_FILE, PARAMS_FILE)
STATE_PREFIX = "experiment_state-"
ASIDE_PREFIX = ".restarted-"


def _state_files(experiment: StoragePath) -> list[StoragePath]:
    return sorted((p for p in experiment.iterdir() if p.name.startswith(STATE_PREFIX) and p.name.endswith(".json")),
                  key=lambda p: p.name)


def _write(path: StoragePath, text: str) -> None:
    if path.is_remote:
        path.write_text(text)  # one PUT: an object store replaces an object whole
    else:
        write_text_atomic(path.local(), text)


def mark_errored_in_state(experiment: str | Path | StoragePath) -> list[str]:
    """Gives the trials of ``errored.json`` the status ERROR in every saved experiment state.

    Without this, an errored trial would be continued as an unfinished one, whatever
    ``resume_errored`` / ``restart_errored`` say. Returns the ids changed.
    """
    location = StoragePath(experiment)
    errored = set(read_errored(location))
    changed: list[str] = []
    if not errored:
        return changed
    for path in _state_files(location):
        state = json.loads(path.read_text())
        touched = False
        for entry in state.get("trial_data", []):
            trial = json.loads(entry[0])
            if trial.get("trial_id") in errored and trial.get("status") in ("PENDING", "RUNNING", "PAUSED"):
                trial["status"] = "ERROR"
                entry[0] = json.dumps(trial, indent=2)
                changed.append(trial["trial_id"])
                touched = True
        if touched:
            _write(path, json.dumps(state))
    return changed


def errored_in_state(experiment: str | Path | StoragePath) -> list[str]:
    """The ids of the trials whose status is ERROR in the newest saved experiment state (the one
    ``Tuner.restore`` loads; the names sort by time)."""
    files = _state_files(StoragePath(experiment))
    if not files:
        return []
    trials = (json.loads(entry[0]) for entry in json.loads(files[-1].read_text()).get("trial_data", []))
    return [t["trial_id"] for t in trials if t.get("status") == "ERROR"]


def set_aside_errored_trials(experiment: str | Path | StoragePath) -> list[str]:
    """Moves what errored trials left in their folders into ``.restarted-<time>/`` (kept).

    Call after :func:`mark_errored_in_state`. The result files are copied, not moved: Tune
    reads them once more while it restores. Returns the trial ids set aside.
    """
    location = StoragePath(experiment)
    ids = errored_in_state(location)  # errored.json's trials included, once marked
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved = []
    for trial_id in ids:
        if location.is_remote:
            done = _set_aside_remote(trial_location(location, trial_id), f"{ASIDE_PREFIX}{stamp}")
        else:
            done = _set_aside_local(trial_folder(location.local(), trial_id), f"{ASIDE_PREFIX}{stamp}")
        if done:
            moved.append(trial_id)
            logger.info("restart_errored: trial_%s set aside in %s%s", trial_id, ASIDE_PREFIX, stamp)
    return moved


def _set_aside_local(folder: Path, aside_name: str) -> bool:
    entries = [p for p in folder.iterdir() if not p.name.startswith(ASIDE_PREFIX)] if folder.is_dir() else []
    if not entries:
        return False
    aside = folder / aside_name
    aside.mkdir()
    for entry in entries:
        if entry.name in RESULT_FILES:
            shutil.copy2(entry, aside / entry.name)
        else:
            os.replace(entry, aside / entry.name)  # a whole checkpoint folder in one rename
    return True


def _set_aside_remote(folder: StoragePath, aside_name: str) -> bool:
    """Object stores have no folders to rename: every object is copied server-side, and the
    original deleted unless it is a result file."""
    files = [rel for rel in folder.files() if not rel.startswith(ASIDE_PREFIX)]
    for rel in files:
        source, target = (folder / rel).path, (folder / aside_name / rel).path
        folder.fs.copy_file(source, target)
        if rel not in RESULT_FILES:
            folder.fs.delete_file(source)
    return bool(files)
