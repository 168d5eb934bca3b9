"""A last readable copy of Ray Tune's experiment state, for ``resume=true`` after a kill.

Tune writes its state into the driver's staging folder and copies it into the experiment
folder file by file (the target created, then written). A driver killed during that copy
leaves empty or truncated ``experiment_state-*.json``, ``search_gen_state-*.json`` or
``searcher-state-*.pkl`` (seen in the suite: both JSON files 0 bytes). ``Tuner.restore``
then logs "Failed to restore the run state", starts the experiment over, and its searcher,
restored without a search space, fails the sweep ("Trying to sample a configuration from
SweepOptunaSearch, but no search space has been defined").

* :class:`TuneStateBackup`, a Tune callback, copies the state files into one archive,
  ``.tune_state.zip`` (written beside it, fsynced and renamed into place), each time they
  changed and every one of them reads whole;
* :func:`repair_tune_state`, before ``Tuner.restore``, puts the archived files back when a
  state file in the folder does not read whole.

The archive can be a save or two older than the kill (Tune saves every second here): a
trial Tune started after it is unknown to the resumed run and runs again from its start,
as with any trial started after Tune's last save. Local experiment folders only: on an
object store (``s3://``) each state file is uploaded in one PUT, which replaces it whole.
"""

from __future__ import annotations

import json
import logging
import os
import time
import zipfile
from pathlib import Path

from ray.tune import Callback

from ..common.atomic import replaced_atomically
from ..common.errors import ConfigError
from .layout import TUNE_STATE_ARCHIVE, TUNE_STATE_PREFIXES

logger = logging.getLogger(__name__)

STATE_PREFIXES, ARCHIVE = TUNE_STATE_PREFIXES, TUNE_STATE_ARCHIVE


def state_files(folder: Path) -> list[Path]:
    """Tune's state files at the top of an experiment folder, by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.startswith(STATE_PREFIXES))


def reads_whole(data: bytes) -> bool:
    """True if a state file's bytes are complete: a pickle ending in its STOP opcode (a cut-off
    pickle does not; checked without unpickling anything), or JSON that parses. Tune names
    its pickled searcher-generator state ``.json`` too, so the bytes decide, not the name."""
    if not data:
        return False
    if data[:1] == b"\x80":   # pickle protocol 2 and later (Tune's cloudpickle)
        return data.endswith(b".")
    try:
        json.loads(data)
    except ValueError:
        return False
    return True


def back_up_tune_state(folder: Path) -> bool:
    """Archives the folder's state files if there is an experiment state and all read whole.

    Returns:
        True if the archive was (re)written.
    """
    files = state_files(folder)
    if not any(p.name.startswith(STATE_PREFIXES[0]) for p in files):
        return False
    contents = {}
    for path in files:
        try:
            contents[path.name] = path.read_bytes()
        except OSError:  # replaced while we read: the next change is archived
            return False
        if not reads_whole(contents[path.name]):
            return False  # mid-copy: keep the last whole set
    with replaced_atomically(folder / ARCHIVE) as tmp:
        with zipfile.ZipFile(tmp, "w") as archive:
            for name, data in contents.items():
                archive.writestr(name, data)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
    return True


def repair_tune_state(folder: Path) -> list[str]:
    """Puts the archived state back if a state file of ``folder`` does not read whole.

    Returns:
        the names of the files restored from the archive (empty: nothing was broken).

    Raises:
        ConfigError: a state file is broken and there is no archive (a sweep killed before
            its first archive, or recorded by a version without one).
    """
    broken = [p.name for p in state_files(folder) if not reads_whole(p.read_bytes())]
    if not broken:
        return []
    archive_path = folder / ARCHIVE
    if not archive_path.is_file():
        raise ConfigError(f"{folder}: Tune's state ({', '.join(broken)}) was cut off by a kill and no whole copy "
                          f"({ARCHIVE}) exists, so resume=true cannot continue this sweep; start it again with a new "
                          f"sweep.name (the finished trials' folders stay in {folder})")
    with zipfile.ZipFile(archive_path) as archive:
        contents = {name: archive.read(name) for name in archive.namelist()}
    for name, data in contents.items():
        with replaced_atomically(folder / name) as tmp:
            tmp.write_bytes(data)
    # A broken file that is not in the archive (written after it) would be read in its place.
    for name in broken:
        if name not in contents:
            (folder / name).rename(folder / f".{name}.broken")
    logger.warning("resume: Tune's state in %s was cut off by the kill (%s unreadable); continuing from its "
                   "last whole copy (%s)", folder, ", ".join(broken), ARCHIVE)
    return sorted(contents)


class TuneStateBackup(Callback):
    """Archives the experiment folder's Tune state whenever it changed (checked at most every
    ``interval_s`` seconds of the driver's loop).

    Args:
        experiment_dir: the local experiment folder.
        interval_s: least time between two checks.
    """

    def __init__(self, experiment_dir: str, interval_s: float = 0.5):
        self.folder, self.interval_s = Path(experiment_dir), interval_s
        self._checked, self._archived = 0.0, None

    def _fingerprint(self):
        return tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in state_files(self.folder))

    def on_step_end(self, iteration, trials, **info) -> None:
        now = time.monotonic()
        if now - self._checked < self.interval_s:
            return
        self._checked = now
        try:
            fingerprint = self._fingerprint()
            if fingerprint != self._archived and back_up_tune_state(self.folder):
                self._archived = fingerprint
        except OSError as error:  # a file replaced between listing and stat: try again next time
            logger.debug("tune state backup skipped: %s", error)

    def on_experiment_end(self, trials, **info) -> None:
        self._checked = 0.0
        self.on_step_end(0, trials)
