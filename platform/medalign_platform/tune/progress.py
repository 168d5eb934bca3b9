"""The sweep's one progress view: a line per trial event, the best so far, a periodic status line.

With ``sweep.verbose=1`` (the default) the console shows this instead of Tune's tables
(about 80 lines of config per trial) and the trials' own output (which goes to each trial's
``trial.log``)::

    medalign sweep smoke: 6 trials, 2 at a time, val/closed_accuracy (max), asha; searching distill.layer, ...
      folder: /abs/sweeps/smoke   TensorBoard: medalign dashboard /abs/sweeps/smoke
    [  0:12] trial_3adb06e4 started   layer=2 lambda_align=1 rank=4
    [  0:31] trial_3adb06e4 step 4/12  val/closed_accuracy=0.5      best 0.5 (3adb06e4)
    [  1:02] trial_3adb06e4 finished  step 12/12 val/closed_accuracy=0.625      [1/6 done, 2 running]
    [  1:30] status: 1 done, 2 running (8882c19c 6/12, 51aa02b1 2/12), 3 pending; best 0.625 (3adb06e4: layer=2 ...)

Only the searched parameters are shown (their last key part when that is unambiguous).
:func:`driver_console` sends the driver's own library logging to ``driver.log`` meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TextIO

from ray.tune import Callback

from ..common.console import DropMessages
from ..common.keys import get_flat, has_flat

STATUS_EVERY_S = 60.0


def short_names(keys: Sequence[str]) -> dict[str, str]:
    """``distill.layer -> layer`` where the last part is unique among ``keys``, else the full key."""
    last = [key.rsplit(".", 1)[-1] for key in keys]
    return {key: (tail if last.count(tail) == 1 else key) for key, tail in zip(keys, last)}


def _value(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class SweepProgress(Callback):
    """Prints one line per trial start, evaluation, finish and error, and a status line every minute.

    Args:
        name: the sweep's name; ``experiment_dir``: its folder.
        params: the searched flat keys (``distill.layer``); ``metric``/``mode``: what ranks trials.
        num_samples / max_concurrent / max_steps / early_stopping: for the header and ``step i/N``.
        stream: where to print (default stderr).
    """

    def __init__(self, *, name: str, experiment_dir: str, params: Sequence[str], metric: str, mode: str,
                 num_samples: int, max_concurrent: int, max_steps: int, early_stopping: str,
                 stream: TextIO | None = None, status_every_s: float = STATUS_EVERY_S):
        self.name, self.experiment_dir = name, experiment_dir
        self.params = list(params)
        self.names = short_names(self.params)
        self.metric, self.mode = metric, mode
        self.num_samples, self.max_concurrent, self.max_steps = num_samples, max_concurrent, max_steps
        self.early_stopping = early_stopping
        self.stream = stream
        self.status_every_s = status_every_s
        self.started = time.monotonic()
        self.last_status = self.started
        self.best: tuple[float, str] | None = None
        self.steps: dict[str, int] = {}
        self.values: dict[str, float] = {}

    # ------------------------------------------------------------------ output

    def _print(self, text: str) -> None:
        stream = self.stream or sys.stderr
        print(text, file=stream, flush=True)

    def _line(self, text: str) -> None:
        elapsed = int(time.monotonic() - self.started)
        self._print(f"[{elapsed // 60:3d}:{elapsed % 60:02d}] {text}")

    def _searched(self, trial) -> str:
        config = trial.config or {}
        shown = [f"{self.names[key]}={_value(get_flat(config, key))}" for key in self.params if has_flat(config, key)]
        return " ".join(shown)

    def _best_text(self) -> str:
        if self.best is None:
            return "best: none yet"
        return f"best {_value(self.best[0])} ({self.best[1]})"

    def _counts(self, trials) -> dict[str, int]:
        counts: dict[str, int] = {}
        for trial in trials:
            counts[trial.status] = counts.get(trial.status, 0) + 1
        return counts

    # ------------------------------------------------------------------ Tune hooks

    def setup(self, **info) -> None:
        self.started = self.last_status = time.monotonic()
        searched = ", ".join(self.params) or "nothing (fixed config)"
        self._print(f"medalign sweep {self.name}: {self.num_samples} trials, {self.max_concurrent} at a time, "
                    f"{self.metric} ({self.mode}), early stopping {self.early_stopping}; searching {searched}")
        self._print(f"  folder: {self.experiment_dir}   TensorBoard: medalign dashboard {self.experiment_dir}   "
                    f"trial output: <folder>/trial_<id>/trial.log")

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._line(f"trial_{trial.trial_id} started   {self._searched(trial)}")

    def on_trial_restore(self, iteration, trials, trial, **info) -> None:
        self._line(f"trial_{trial.trial_id} resumed from its checkpoint")

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        self._line(f"trial_{trial.trial_id} failed; retrying from its last checkpoint "
                   f"(attempt {trial.run_metadata.num_failures + 1}; see its trial.log)")

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        value = result.get(self.metric)
        step = result.get("step")
        if isinstance(step, int):
            self.steps[trial.trial_id] = step
        if not isinstance(value, (int, float)):
            return
        self.values[trial.trial_id] = value
        if self.best is None or (value > self.best[0] if self.mode == "max" else value < self.best[0]):
            self.best = (value, trial.trial_id)
        self._line(f"trial_{trial.trial_id} step {step}/{self.max_steps}  {self.metric}={_value(value)}      "
                   f"{self._best_text()}")

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        counts = self._counts([t for t in trials if t is not trial])  # Tune sets this one's status afterwards
        step = self.steps.get(trial.trial_id)
        early = " (stopped early)" if isinstance(step, int) and step < self.max_steps else ""
        value = self.values.get(trial.trial_id)
        shown = f" {self.metric}={_value(value)}" if value is not None else ""
        self._line(f"trial_{trial.trial_id} finished  step {step}/{self.max_steps}{early}{shown}      "
                   f"[{counts.get('TERMINATED', 0) + 1}/{self.num_samples} done, {counts.get('RUNNING', 0)} running, "
                   f"{counts.get('ERROR', 0)} errored]")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._line(f"trial_{trial.trial_id} ERROR     after step {self.steps.get(trial.trial_id, 0)}: see "
                   f"{trial.path}/error.txt and trial.log")

    def on_step_end(self, iteration, trials, **info) -> None:
        now = time.monotonic()
        if now - self.last_status < self.status_every_s:
            return
        self.last_status = now
        counts = self._counts(trials)
        running = [t for t in trials if t.status == "RUNNING"]
        shown = ", ".join(f"{t.trial_id} {self.steps.get(t.trial_id, 0)}/{self.max_steps}" for t in running)
        self._line(f"status: {counts.get('TERMINATED', 0)} done, {len(running)} running ({shown}), "
                   f"{counts.get('PENDING', 0)} pending, {counts.get('ERROR', 0)} errored; {self._best_text()}")


# Tune's lines that point elsewhere than this platform: its resume hint (Tuner.restore; the
# platform prints `medalign sweep ... resume=true`), its list of unfinished trials (the
# platform's summary says it), its throwaway TensorBoard in the Ray session folder, and a
# failed trial's traceback (the progress view names the trial's error.txt; driver.log has it).
TUNE_CHATTER = ("Tuner.restore", "Trials did not complete", "tensorboard --logdir", "Experiment has been interrupted",
                "Stop signal received", "Trial task failed for trial")  # the last: the progress view names error.txt


# Loggers that log the chatter above (a filter on the logger itself holds whatever handlers
# Ray installs: ``ray.init`` removes every handler of the ``ray`` logger).
CHATTER_LOGGERS = ("ray.tune.tune", "ray.tune.execution.tune_controller", "ray.tune.impl.tuner_internal")


class DriverConsole:
    """The sweep driver's console while the sweep runs (``sweep.verbose`` < 2).

    INFO and up of Ray, Tune and Optuna, and Python warnings, go to ``log_file``; Tune's
    chatter (:data:`TUNE_CHATTER`) is dropped; what Tune still prints at verbosity 0 (its
    experiment table) goes to the file through :meth:`stdout_to_log`. :meth:`install`
    again after ``ray.init``, which removes the handlers of the ``ray`` logger.
    """

    def __init__(self, log_file: Path, verbose: int):
        self.log_file, self.quiet = log_file, verbose < 2
        self.handler: logging.Handler | None = None
        self.chatter = DropMessages(*TUNE_CHATTER)
        self._saved: dict = {}

    def install(self) -> None:
        import optuna

        if not self.quiet:
            return
        if self.handler is None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            self.handler = logging.FileHandler(self.log_file, encoding="utf-8")
            self.handler.setLevel(logging.INFO)
            self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            self._saved = {"optuna": optuna.logging.get_verbosity()}
        ray_logger = logging.getLogger("ray")
        if self.handler not in ray_logger.handlers:
            ray_logger.addHandler(self.handler)
        for name in CHATTER_LOGGERS:
            logging.getLogger(name).addFilter(self.chatter)  # a second add is a no-op
        optuna.logging.set_verbosity(optuna.logging.INFO)
        optuna.logging.disable_default_handler()
        optuna_logger = logging.getLogger("optuna")
        if self.handler not in optuna_logger.handlers:
            optuna_logger.addHandler(self.handler)
        logging.captureWarnings(True)
        warnings_logger = logging.getLogger("py.warnings")
        if self.handler not in warnings_logger.handlers:
            warnings_logger.addHandler(self.handler)
        warnings_logger.propagate = False

    @contextlib.contextmanager
    def stdout_to_log(self) -> Iterator[None]:
        """``print`` output of the block (Tune's experiment table) appended to the log file."""
        if not self.quiet:
            yield
            return
        with self.log_file.open("a", encoding="utf-8") as stream, contextlib.redirect_stdout(stream):
            yield

    def restore(self) -> None:
        import optuna

        if not self.quiet or self.handler is None:
            return
        for name in ("ray", "optuna", "py.warnings"):
            logging.getLogger(name).removeHandler(self.handler)
        for name in CHATTER_LOGGERS:
            logging.getLogger(name).removeFilter(self.chatter)
        optuna.logging.enable_default_handler()
        optuna.logging.set_verbosity(self._saved["optuna"])
        logging.captureWarnings(False)
        logging.getLogger("py.warnings").propagate = True
        self.handler.close()
        self.handler = None


@contextlib.contextmanager
def driver_console(log_file: Path, verbose: int) -> Iterator[DriverConsole]:
    """:class:`DriverConsole` installed for the block (and restored after it)."""
    console = DriverConsole(log_file, verbose)
    console.install()
    try:
        yield console
    finally:
        console.restore()
