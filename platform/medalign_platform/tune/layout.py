"""The experiment folder of a sweep (or ablation): file names, trial folders, the recorded spec.

::

    <sweep.output_dir>/<sweep.name>/
        sweep.json            the resolved sweep plan, base config and search space (resume, status)
        driver.json           the sweep driver: pid, host, state (running | finished | interrupted), exit status
        errored.json          the trials the driver saw error for good
        summary.json          what run_sweep returned, plus one record per trial
        driver.log            what the driver's libraries logged (Ray, Tune, Optuna), when the console is quiet
        optuna.db             the Optuna study (SQLite; study name = sweep name)
        experiment_state-*    Ray Tune's own state (Tuner.restore)
        .tune_state.zip       the last whole copy of Tune's state files (tune/state_backup.py; local folders)
        trial_<id>/           one folder per Tune trial:
            final.json            its final metrics and timings
            result.json           one JSON line per evaluation Tune received (append-only across resumes)
            progress.csv          the same rows as CSV
            trial.log             what the trial's processes printed (quiet console)
            tensorboard/          its TensorBoard events
            train/                its Ray Train run (executor=train): checkpoints, snapshot
            checkpoint_*/         its Tune checkpoints (executor=inline), each with manifest.json
            .restarted-<time>/    what an errored attempt left, set aside by resume=true sweep.restart_errored=true
        results/              medalign status: leaderboard, best_experiment.yaml, importances, history
        tensorboard/          medalign status: one HParams run per trial
        ablation/             medalign ablate-layers: the grid, its table, plot and TensorBoard

The folder may be on remote storage (``sweep.output_dir=s3://bucket/prefix``): the driver and
the trials write it through :mod:`medalign_platform.run.filesystems`, and readers work on a
local mirror of its records (:func:`mirror_experiment`; checkpoints are not copied).
"""

from __future__ import annotations

import json
import os
import socket
import stat
import time
from pathlib import Path

from ..common.errors import ConfigError
from ..run.filesystems import StoragePath, is_uri, mirror
from .study_storage import StudyStorage, resolve_storage

SWEEP_SPEC_FILE = "sweep.json"
DRIVER_FILE = "driver.json"
ERRORED_FILE = "errored.json"  # {trial id: {"at": time}} of trials that errored for good (tune/result_log.py)
DRIVER_LOG = "driver.log"
TRIAL_LOG = "trial.log"
SUMMARY_FILE = "summary.json"
FINAL_FILE = "final.json"
STUDY_FILE = "optuna.db"
TRAIN_RUN_NAME = "train"      # the Ray Train run's folder inside each trial folder
MANIFEST_FILE = "manifest.json"  # size and SHA-256 of every file of a checkpoint (run/checkpoint.py)
META_KEY = "_sweep"           # reserved top-level key of a trial config: experiment dir, executor, rules
# Ray Tune's state files at the top of the folder (Tuner.restore reads them; the last two are
# pickles, search_gen_state-* under a .json name) and their last whole copy (tune/state_backup.py).
TUNE_STATE_PREFIXES = ("experiment_state-", "search_gen_state-", "searcher-state-")
TUNE_STATE_ARCHIVE = ".tune_state.zip"


def trial_dirname(trial) -> str:
    """``trial_<id>``: Tune's trial folder name (``trial_dirname_creator``)."""
    return f"trial_{trial.trial_id}"


def trial_folder(experiment_dir: str | Path, trial_id: str) -> Path:
    """``EXP_DIR/trial_<id>``: the trial's folder in the experiment (not Tune's local staging
    copy, which lives in the Ray session folder and is gone after a restart)."""
    return Path(experiment_dir) / f"trial_{trial_id}"


def trial_location(experiment: str | Path | StoragePath, trial_id: str) -> StoragePath:
    """:func:`trial_folder` for an experiment on local or remote storage."""
    return StoragePath(experiment) / f"trial_{trial_id}"


def study_url(experiment_dir: str | Path) -> str:
    """The SQLite URL of the sweep's Optuna study, at the folder's own path (a moved folder works)."""
    return f"sqlite:///{Path(experiment_dir).resolve() / STUDY_FILE}"


def study_storage(experiment_dir: str | Path, spec: dict | None = None) -> StudyStorage:
    """The Optuna study of a local sweep folder (or mirror): its recorded ``sweep.storage``, with a
    file study looked up beside ``sweep.json`` (a moved or mirrored folder keeps its study)."""
    spec = spec if spec is not None else load_spec(experiment_dir)
    return resolve_storage(spec["settings"].get("storage"), experiment_dir)


def load_spec(experiment_dir: str | Path | StoragePath) -> dict:
    """The recorded ``sweep.json`` (of a local folder or a remote location).

    Raises:
        ConfigError: the folder is not a sweep experiment folder.
    """
    path = StoragePath(experiment_dir) / SWEEP_SPEC_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{experiment_dir} has no {SWEEP_SPEC_FILE}: not a sweep experiment folder") from None


def skip_when_mirroring(relative: str) -> bool:
    """Files a reader of a remote experiment does not fetch: checkpoints (large, and read only by
    resume), and the ``results/`` and ``tensorboard/`` folders that ``medalign status`` rebuilds."""
    parts = relative.split("/")
    return parts[0] in ("results", "tensorboard") or any(p.startswith("checkpoint_") for p in parts)


def mirror_experiment(location: str | StoragePath) -> Path:
    """A local, up-to-date copy of a remote sweep folder's records (see :func:`skip_when_mirroring`).

    Raises:
        ConfigError: the location holds no ``sweep.json``.
    """
    place = StoragePath(location)
    if not (place / SWEEP_SPEC_FILE).is_file():
        hint = ""
        inside = sorted(p.name for p in place.iterdir() if (p / SWEEP_SPEC_FILE).is_file())
        if inside:
            hint = f"; it holds the sweeps {inside}: pass one of them, e.g. {place / inside[0]}"
        raise ConfigError(f"{place} is not a sweep folder (no {SWEEP_SPEC_FILE}){hint}")
    return mirror(place, skip=skip_when_mirroring)


def make_private(folder: Path) -> None:
    """Mode 0700 on a local experiment folder: ``resume=true`` unpickles Tune's state files in it,
    so whoever may write there could run code as the user who resumes."""
    os.chmod(folder, 0o700)


def check_private(folder: str | Path) -> None:
    """Refuses to resume from a local experiment folder that other users may write to.

    Tune's experiment state (``tuner.pkl``, ``searcher-state-*.pkl``, ``search_gen_state-*.json``,
    and their copy in ``.tune_state.zip`` that resume may put back) is unpickled on resume: a
    file someone else could replace would run their code as you.

    Raises:
        ConfigError: the folder (or a state file in it) is group/world-writable or not yours.
    """
    if is_uri(folder):
        return
    root = Path(folder)
    state = [p for p in root.iterdir() if p.name.startswith(TUNE_STATE_PREFIXES) or p.name == TUNE_STATE_ARCHIVE]
    for path in [root, *sorted({*root.glob("*.pkl"), *state})]:
        info = path.stat()
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) or (hasattr(os, "geteuid") and info.st_uid != os.geteuid()):
            raise ConfigError(
                f"resume=true refused: {path} can be written by other users (mode {stat.filemode(info.st_mode)}, "
                f"owner uid {info.st_uid}); resuming unpickles Tune's state files, which would run code they "
                f"wrote. Check the folder, then `chmod -R go-w {root}` (medalign creates it with mode 0700)")


def check_experiment_dir(path: str | Path) -> Path:
    """The experiment folder of a sweep, or a ConfigError saying what it is instead and what to pass.

    Raises:
        ConfigError: the path does not exist, is not a sweep folder (no ``sweep.json``), or
            the sweep has not saved Tune's experiment state yet.

    A remote folder (``s3://...``) is checked there and mirrored: the local mirror is returned.
    """
    if is_uri(path):
        folder = mirror_experiment(path)
        if not any(folder.glob("experiment_state-*.json")):
            raise ConfigError(f"{path}: the sweep has not saved Ray Tune's experiment state yet (it is still "
                              f"starting); run `medalign status {path}` again once its first trial runs")
        return folder
    folder = Path(path).expanduser()
    if not folder.exists():
        raise ConfigError(f"{path} does not exist; pass the experiment folder of a sweep: "
                          f"<sweep.output_dir>/<sweep.name>, e.g. sweeps/synthmed_vqa-smoke")
    if not folder.is_dir():
        raise ConfigError(f"{path} is a file; pass the experiment folder of a sweep (the folder holding sweep.json)")
    if not (folder / SWEEP_SPEC_FILE).is_file():
        hint = "pass the folder that `medalign sweep` or `medalign ablate-layers` wrote (it holds sweep.json)"
        inside = sorted(p.parent.name for p in folder.glob(f"*/{SWEEP_SPEC_FILE}"))
        if inside:
            hint = f"it holds the sweeps {inside}: pass one of them, e.g. {folder / inside[0]}"
        elif (folder.parent / SWEEP_SPEC_FILE).is_file():
            hint = f"it is inside the sweep folder {folder.parent}: pass that"
        raise ConfigError(f"{path} is not a sweep folder (no {SWEEP_SPEC_FILE}); {hint}")
    if not any(folder.glob("experiment_state-*.json")):
        raise ConfigError(f"{path}: the sweep has not saved Ray Tune's experiment state yet (it is still starting); "
                          f"run `medalign status {path}` again once its first trial runs")
    return folder.resolve()


def write_driver_state(experiment_dir: str | Path | StoragePath, state: str, **extra) -> None:
    """Records the sweep driver in ``driver.json`` (a local folder or a URI): this process, its host and ``state``."""
    import psutil

    me = psutil.Process()
    (StoragePath(experiment_dir) / DRIVER_FILE).write_json({
        "pid": me.pid, "host": socket.gethostname(), "create_time": me.create_time(), "state": state,
        "updated": time.time(), **extra})


def read_driver_state(experiment_dir: str | Path | StoragePath) -> dict:
    """``driver.json`` (``{}`` when absent or unreadable)."""
    try:
        return json.loads((StoragePath(experiment_dir) / DRIVER_FILE).read_text())
    except (OSError, ValueError):
        return {}


def sweep_running(experiment_dir: str | Path | StoragePath) -> bool:
    """Whether a sweep driver is running on this folder now.

    True when ``driver.json`` says ``running`` and its process is alive (checked by pid and
    start time on this host; a driver on another host is taken at its word).
    """
    import psutil

    state = read_driver_state(experiment_dir)
    if state.get("state") != "running":
        return False
    if state.get("host") != socket.gethostname():
        return True
    try:
        process = psutil.Process(int(state.get("pid", -1)))
        same = abs(process.create_time() - float(state.get("create_time", 0))) < 1.0  # not a reused pid
        return same and process.status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, ValueError, TypeError):
        return False


def read_errored(experiment_dir: str | Path | StoragePath) -> dict:
    """``errored.json`` (``{}`` when absent or unreadable)."""
    try:
        data = json.loads((StoragePath(experiment_dir) / ERRORED_FILE).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}
