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
from pathlib import Path

from ray.tune.logger import LoggerCallback

from ..common.keys import flatten
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
