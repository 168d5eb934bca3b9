"""Each trial's ``result.json`` / ``progress.csv``: append-only, across resumes and retries.

Ray Tune's own JSON and CSV loggers write into a staging folder of the Ray session and sync
it over the trial folder; a resumed sweep has a new session whose staging copy starts
empty (unless Tune restored a checkpoint of that trial), so the synced file loses the rows
of the earlier run, and a retried trial's copy can be overwritten with an older one. Tune's
TensorBoard logger adds an event file to every trial folder, so TensorBoard on the sweep
folder shows each trial twice. The sweep therefore turns Tune's default loggers off
(``TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=1``) and uses :class:`TrialResultLog`: one row per
result Tune receives, appended straight to the trial folder and flushed to disk; a row
whose ``step`` the file already holds (a trial resumed from an earlier checkpoint reports
it again) is not written twice, and a line a kill cut short is dropped before appending.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import time
from pathlib import Path

from ray.tune import Callback
from ray.tune.logger import LoggerCallback

from ..common.keys import flatten, get_flat
from ..run.filesystems import StoragePath
from .layout import ERRORED_FILE, read_errored
from .trial import scalars

logger = logging.getLogger(__name__)

RESULT_FILE = "result.json"
PROGRESS_FILE = "progress.csv"
PARAMS_FILE = "params.json"


def _complete_lines(path: Path) -> str:
    """The file's text up to its last newline (a line a kill cut short is dropped from the file)."""
    if not path.is_file():
        return ""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end != len(data):
        with path.open("r+b") as handle:
            handle.truncate(end)
    return data[:end].decode("utf-8", errors="replace")


def _append(path: Path, text: str) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


class TrialResultLog(LoggerCallback):
    """Appends every trial result to ``result.json`` (JSON lines) and ``progress.csv`` in the trial folder."""

    def __init__(self):
        self._last_step: dict[str, int] = {}
        self._columns: dict[str, list[str]] = {}

    @staticmethod
    def _folder(trial) -> Path:
        """The trial folder itself on a local (or mounted) filesystem; elsewhere (``s3://``) Tune's
        staging copy of it, which Tune uploads."""
        filesystem = getattr(trial.storage, "storage_filesystem", None)
        if filesystem is not None and getattr(filesystem, "type_name", "local") != "local":
            return Path(trial.local_path)
        return Path(trial.path)

    def log_trial_start(self, trial) -> None:
        folder = self._folder(trial)
        folder.mkdir(parents=True, exist_ok=True)
        steps = []
        for line in _complete_lines(folder / RESULT_FILE).splitlines():
            try:
                step = json.loads(line).get("step")
            except ValueError:
                continue
            if isinstance(step, int):
                steps.append(step)
        self._last_step[trial.trial_id] = max(steps, default=-1)
        header = _complete_lines(folder / PROGRESS_FILE).splitlines()[:1]
        self._columns[trial.trial_id] = next(csv.reader(header)) if header else []
        params = {k: v for k, v in flatten(trial.config or {}).items() if not k.startswith("_")}
        (folder / PARAMS_FILE).write_text(json.dumps(params, indent=1, sort_keys=True, default=str))

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        if trial.trial_id not in self._last_step:
            self.log_trial_start(trial)
        row = scalars({k: v for k, v in result.items() if k != "config"})
        step = row.get("step")
        if isinstance(step, int):
            if step <= self._last_step[trial.trial_id]:
                return  # already recorded by an earlier run of this trial
            self._last_step[trial.trial_id] = step
        folder = self._folder(trial)
        _append(folder / RESULT_FILE, json.dumps(row, sort_keys=True) + "\n")
        columns = self._columns[trial.trial_id]
        text = io.StringIO()
        writer = csv.writer(text)
        if not columns:
            columns = self._columns[trial.trial_id] = sorted(row)
            writer.writerow(columns)
        writer.writerow(["" if row.get(c) is None else row[c] for c in columns])  # later keys: result.json only
        _append(folder / PROGRESS_FILE, text.getvalue())

    def log_trial_end(self, trial, failed: bool = False) -> None:
        self._last_step.pop(trial.trial_id, None)
        self._columns.pop(trial.trial_id, None)


class StudyLink(Callback):
    """Puts a finished trial that the Optuna study never saw into the study, with its parameters and values.

    ``resume=true sweep.restart_errored=true`` makes Tune run an errored trial again as a new
    trial with a new id, which Tune's searcher ignores (it only knows the ids it suggested);
    without this, the restarted trial's result never reaches the study (its importances,
    history and optuna-dashboard).
    """

    def __init__(self, study_storage, study_name: str, metrics: list[str]):
        """``study_storage``: the sweep's :class:`~medalign_platform.tune.study_storage.StudyStorage`."""
        self.study_storage, self.study_name, self.metrics = study_storage, study_name, list(metrics)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        import optuna

        study = optuna.load_study(study_name=self.study_name, storage=self.study_storage.open())
        known = study.get_trials(deepcopy=False)
        if any(t.user_attrs.get("tune_trial_id") == trial.trial_id for t in known):
            return
        result = trial.last_result or {}
        values = [result.get(metric) for metric in self.metrics]
        template = next((t for t in known if t.distributions), None)
        if template is None or any(not isinstance(v, (int, float)) for v in values):
            return
        params = {}
        for name, distribution in template.distributions.items():
            key = name.replace("/", ".")
            try:
                params[name] = get_flat(trial.config, key)
            except KeyError:
                return
        values_arg = {"values": values} if len(values) > 1 else {"value": values[0]}
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions=template.distributions, **values_arg,
            user_attrs={"tune_trial_id": trial.trial_id, "restarted": True}))
        logger.info("study: added trial %s (a restarted trial the searcher did not suggest)", trial.trial_id)


class TrialErrors(Callback):
    """Records in ``errored.json`` which trials errored for good (no retry left), as the driver saw it.

    Tune's saved experiment state does not always hold a trial's ``ERROR`` status: the last
    snapshot can be taken while the trial still shows ``RUNNING``. The records read this file
    so that the summary, the leaderboard and the exit status agree with what happened. A
    trial that starts again (``sweep.resume_errored=true``) leaves the file.
    """

    def __init__(self, experiment_dir: str):
        self.experiment = StoragePath(experiment_dir)  # a local folder or a URI

    def _update(self, trial_id: str, errored: bool) -> None:
        current = read_errored(self.experiment)
        if errored:
            current[trial_id] = {"at": time.time()}
        elif trial_id not in current:
            return
        else:
            current.pop(trial_id)
        (self.experiment / ERRORED_FILE).write_json(current)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._update(trial.trial_id, True)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._update(trial.trial_id, False)
