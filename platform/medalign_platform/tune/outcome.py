"""How a sweep ended: its exit status, the command that resumes it, and Ctrl-C / SIGTERM handling.

``medalign sweep`` never reports success it did not have:

====  ==========================================================================
 0    every trial finished (``TERMINATED``, early-stopped ones included)
 1    trials errored (all or some): the line names them, their error files, and
      ``resume=true sweep.restart_errored=true`` (from scratch) or
      ``sweep.resume_errored=true`` (from their checkpoints)
 2    bad input, before anything ran (the CLI's one-line errors)
 3    partial: the sweep ended with unfinished or missing trials
130   interrupted by Ctrl-C (SIGINT); 143 by SIGTERM (``ray job stop``)
====  ==========================================================================

Interruption: while Tune runs, the first SIGINT or SIGTERM asks Tune to stop the way its
own Ctrl-C handler does (it saves the experiment state once more and ends the trials);
a second one stops at once. Either way the command that continues the sweep is printed:
``medalign sweep <the same arguments> resume=true`` (Tune's own hint, ``Tuner.restore``,
is not shown: it is not how this platform resumes).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_ERRORED, EXIT_PARTIAL = 0, 1, 3
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Tune always listens to SIGUSR1 while it runs, and handles it like its Ctrl-C: stop gracefully.
TUNE_STOP_SIGNAL = signal.SIGUSR1
TUNE_SIGINT_ENV = "TUNE_DISABLE_SIGINT_HANDLER"


@dataclass
class Interruption:
    """What :func:`interruptible` saw: the first stop signal, if any.

    ``ray.init`` installs Ray's own crash handler for SIGTERM (it aborts the process), so
    :meth:`install` must run again once Ray is up.
    """

    signum: int | None = None
    tune_running: bool = False
    _handlers: dict = field(default_factory=dict)

    def install(self) -> None:
        """(Re)installs the stop-signal handlers (after ``ray.init`` replaced SIGTERM's)."""
        for sig, handler in self._handlers.items():
            signal.signal(sig, handler)

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum else None

    @property
    def exit_status(self) -> int:
        return 128 + int(self.signum or 0)


@contextlib.contextmanager
def interruptible() -> Iterator[Interruption]:
    """Catches SIGINT and SIGTERM for the block: the first asks a running Tune loop to stop
    gracefully (``interruption.tune_running`` must be set around ``Tuner.fit``), or, before
    Tune runs, stops the block with ``KeyboardInterrupt``; a second one stops it at once.

    Only in the main thread (signal handlers cannot be set elsewhere); otherwise a no-op.
    """
    interruption = Interruption()
    if threading_main() is False:
        yield interruption
        return

    def handler(signum, frame):
        first = interruption.signum is None
        interruption.signum = interruption.signum or signum
        if first and interruption.tune_running:
            os.kill(os.getpid(), TUNE_STOP_SIGNAL)  # Tune saves its state and ends the trials
            return
        raise KeyboardInterrupt

    def early_tune_stop(signum, frame):  # Tune replaces this with its own once its loop is set up
        raise KeyboardInterrupt

    interruption._handlers = {**{sig: handler for sig in STOP_SIGNALS}, TUNE_STOP_SIGNAL: early_tune_stop}
    previous = {sig: signal.signal(sig, h) for sig, h in interruption._handlers.items()}
    saved_env = os.environ.get(TUNE_SIGINT_ENV)
    os.environ[TUNE_SIGINT_ENV] = "1"  # Tune would replace our SIGINT handler with its own
    try:
        yield interruption
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        if saved_env is None:
            os.environ.pop(TUNE_SIGINT_ENV, None)
        else:
            os.environ[TUNE_SIGINT_ENV] = saved_env


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def resume_command(overrides: Sequence[str], experiment_dir, *, restart_errored: bool = False,
                   command: str = "sweep", prefix: str = "sweep") -> str:
    """``medalign sweep <overrides> sweep.output_dir=<abs> sweep.name=<name> resume=true [...]``.

    The folder is spelled out (absolute), so the command works from any directory; earlier
    ``resume=``/``sweep.resume_errored``/``sweep.restart_errored`` overrides are replaced.
    ``command``/``prefix``: ``ablate-layers``/``ablation`` for a layer ablation.
    """
    from pathlib import Path

    drop = ("resume=", "sweep.resume=", "sweep.resume_errored=", "sweep.restart_errored=", f"{prefix}.output_dir=",
            f"{prefix}.name=")
    kept = [o for o in overrides if not o.startswith(drop)]
    folder = Path(experiment_dir)
    kept += [f"{prefix}.output_dir={folder.parent}", f"{prefix}.name={folder.name}", "resume=true"]
    if restart_errored:
        kept.append("sweep.restart_errored=true")
    return f"medalign {command} " + " ".join(shlex.quote(o) for o in kept)


def sweep_outcome(summary: dict, expected_trials: int, overrides: Sequence[str], *, command: str = "sweep",
                  prefix: str = "sweep", experiment_dir=None) -> tuple[int, str]:
    """The exit status of a finished (or interrupted) sweep and the line that explains it.

    Args:
        summary: :func:`~medalign_platform.tune.driver.run_sweep`'s result.
        expected_trials: ``sweep.num_samples``.
        overrides: the command's arguments (for the resume command).
        command / prefix / experiment_dir: for ``medalign ablate-layers`` (whose folder
            is ``ablation.output_dir/ablation.name``).
    """
    folder = experiment_dir or summary["experiment_dir"]

    def resume(restart_errored: bool = False) -> str:
        return resume_command(overrides, folder, restart_errored=restart_errored, command=command, prefix=prefix)

    counts = summary["trials"]
    total = summary["num_trials"]
    done = counts.get("TERMINATED", 0)
    errored = counts.get("ERROR", 0)
    if summary.get("interrupted"):
        signum = int(getattr(signal.Signals, summary["interrupted"]))
        return 128 + signum, (f"interrupted by {summary['interrupted']} with {done} of {expected_trials} trials "
                              f"finished; the state is saved. Resume with:\n  {resume()}")
    if errored:
        failed = summary.get("errored") or []
        where = "; ".join(f"trial_{r['trial_id']}: {r['error'] or 'no error file'}" for r in failed[:3])
        return EXIT_ERRORED, (f"{errored} of {total} trials errored ({where}{'; ...' if len(failed) > 3 else ''}). "
                              f"Restart them from scratch with:\n  {resume(restart_errored=True)}\n"
                              f"(or continue them from their checkpoints: sweep.resume_errored=true instead)")
    if done < expected_trials:
        return EXIT_PARTIAL, (f"partial: {done} of {expected_trials} trials finished ({counts}). Continue with:\n"
                              f"  {resume()}")
    return EXIT_OK, f"{done} of {expected_trials} trials finished"


def sweep_command(overrides: Sequence[str]) -> int:
    """``medalign sweep ...``: runs the sweep, prints its summary and leaderboard, returns its exit status."""
    from ..common.errors import ConfigError
    from .driver import run_sweep
    from .results import status_report, write_results

    summary = run_sweep(overrides)
    experiment_dir = summary["experiment_dir"]
    status, line = sweep_outcome(summary, summary["num_samples"], overrides)
    print(f"medalign sweep: {summary['num_trials']} trials {summary['trials']} in {summary['wall_s']:.0f} s; "
          f"early stopping: {summary['early_stopping']}; summary: {experiment_dir}/summary.json", file=sys.stderr)
    if summary.get("logs"):
        print(f"  logs: {summary['logs']}", file=sys.stderr)
    if summary["num_trials"]:
        try:
            print(status_report(write_results(experiment_dir), 10))
        except ConfigError as error:  # stopped before Tune saved any state: nothing to tabulate
            logger.info("no leaderboard: %s", error)
    print(f"medalign sweep: {line}", file=sys.stderr)
    return status
