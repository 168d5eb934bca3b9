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
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

from ..common.errors import ConfigError

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


def trial_dirname(trial) -> str:
    """``trial_<id>``: Tune's trial folder name (``trial_dirname_creator``)."""
    return f"trial_{trial.trial_id}"


def trial_folder(experiment_dir: str | Path, trial_id: str) -> Path:
    """``EXP_DIR/trial_<id>``: the trial's folder in the experiment (not Tune's local staging
    copy, which lives in the Ray session folder and is gone after a restart)."""
    return Path(experiment_dir) / f"trial_{trial_id}"


def study_url(experiment_dir: str | Path) -> str:
    """The SQLite URL of the sweep's Optuna study, at the folder's own path (a moved folder works)."""
    return f"sqlite:///{Path(experiment_dir).resolve() / STUDY_FILE}"


def load_spec(experiment_dir: str | Path) -> dict:
    """The recorded ``sweep.json``.

    Raises:
        ConfigError: the folder is not a sweep experiment folder.
    """
    path = Path(experiment_dir) / SWEEP_SPEC_FILE
    if not path.is_file():
        raise ConfigError(f"{experiment_dir} has no {SWEEP_SPEC_FILE}: not a sweep experiment folder")
    return json.loads(path.read_text())


def check_experiment_dir(path: str | Path) -> Path:
    """The experiment folder of a sweep, or a ConfigError saying what it is instead and what to pass.

    Raises:
        ConfigError: the path does not exist, is not a sweep folder (no ``sweep.json``), or
            the sweep has not saved Tune's experiment state yet.
    """
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


def write_driver_state(experiment_dir: str | Path, state: str, **extra) -> None:
    """Records the sweep driver in ``driver.json``: this process, its host and ``state``."""
    from ..common.atomic import write_json_atomic

    import psutil

    me = psutil.Process()
    write_json_atomic(Path(experiment_dir) / DRIVER_FILE, {
        "pid": me.pid, "host": socket.gethostname(), "create_time": me.create_time(), "state": state,
        "updated": time.time(), **extra})


def read_driver_state(experiment_dir: str | Path) -> dict:
    """``driver.json`` (``{}`` when absent or unreadable)."""
    try:
        return json.loads((Path(experiment_dir) / DRIVER_FILE).read_text())
    except (OSError, ValueError):
        return {}


def sweep_running(experiment_dir: str | Path) -> bool:
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


def read_errored(experiment_dir: str | Path) -> dict:
    """``errored.json`` (``{}`` when absent or unreadable)."""
    try:
        data = json.loads((Path(experiment_dir) / ERRORED_FILE).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}
