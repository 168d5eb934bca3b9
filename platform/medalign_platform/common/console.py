"""Keeping the console quiet: a process's output sent to a log file, library chatter filtered.

A sweep prints one progress view; what its trials and Ray Train workers print (weight
loading bars, library deprecation warnings, Ray's per-checkpoint INFO lines, open_clip's
INFO logs) goes to a log file per trial instead. :func:`output_to_file` redirects the
process's own stdout and stderr file descriptors, so output written by C extensions and
subprocesses lands there too, and restores them afterwards (a reused Tune actor runs the
next trial with its own file). :func:`quiet_ray_worker` silences Tune's own INFO lines in
Ray's worker processes, which print before a trial's own code runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

QUIET_LOGGERS = ("ray.tune", "ray.train")  # their INFO lines in Ray's worker processes: trial.log, not the console


@contextlib.contextmanager
def output_to_file(path: str | Path | None) -> Iterator[Path | None]:
    """Sends this process's stdout and stderr (file descriptors 1 and 2) to ``path`` (appended).

    ``None`` leaves the output where it is. Python warnings are shown once per location
    and go to the file as well, through the redirected stderr; so do Tune's and Train's
    INFO lines ("Checkpoint successfully created"), which :func:`quiet_ray_worker` keeps
    off the console otherwise.
    """
    if path is None:
        yield None
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = [os.dup(1), os.dup(2)]
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    try:
        os.dup2(target, 1)
        os.dup2(target, 2)
        for name in QUIET_LOGGERS:  # in the file they are the record of what Ray did for this run
            logging.getLogger(name).setLevel(logging.INFO)
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            yield path
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, target):
            os.close(fd)


class DropMessages(logging.Filter):
    """A logging filter that drops records whose message contains any of ``fragments``."""

    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is not ours to judge
            return True
        return not any(fragment in message for fragment in self.fragments)


def quiet_ray_worker() -> None:
    """Ray's ``worker_process_setup_hook`` for a quiet sweep: Tune's and Train's INFO lines in the
    trial processes ("Restored on ... from checkpoint", "Checkpoint successfully created")
    are not forwarded to the driver's console; warnings and errors still are."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
