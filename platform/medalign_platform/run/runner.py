"""One in-process runner: what every process that trains a run sets up around the loop.

A Ray Train worker (:mod:`medalign_platform.run.ray_train`) and an inline sweep trial
(:mod:`medalign_platform.tune.trial`) both call :func:`run_in_process`. It gives the loop
a scratch folder for checkpoints, the rank-0 TensorBoard logger, the test fault hook, and
a ``report`` that seals each checkpoint (its manifest then covers the predictions the loop
added) and deletes the folder once the caller's own report (Ray Train's or Tune's, which
persist it) has returned. A ``run.log_dir`` on remote storage (``s3://...``) is written in
the scratch folder and uploaded after every checkpoint and at the end.

A resumed run purges its TensorBoard events after the step it resumes from (and a run
restarted from scratch over a local folder all earlier ones), so steps logged by a process
that died before its next checkpoint are not shown twice. With ``run.console_log`` set (a
sweep sets one per trial on a local folder) the process's stdout and stderr go to that file
for the duration of the run.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from ..common.console import output_to_file
from .checkpoint import checkpoint_step, seal_checkpoint
from .filesystems import StoragePath
from .loop import RunContext, run_training
from .settings import RunSettings

KILL_ENV = "MEDALIGN_TEST_KILL"


def kill_hook(rank: int) -> Callable[[int], None] | None:
    """Fault injection for tests: ``MEDALIGN_TEST_KILL=RANK:STEP:MARKER`` SIGKILLs that rank's
    own process once, right after STEP, and leaves MARKER so it happens only once."""
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return None
    kill_rank, kill_step, marker = spec.split(":", 2)
    if int(kill_rank) != rank:
        return None

    def after_step(step: int) -> None:
        if step == int(kill_step) and not os.path.exists(marker):
            Path(marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)

    return after_step


def run_in_process(config: Mapping | RunSettings, report: Callable[[dict, Path | None], None], *,
                   device: torch.device, rank: int = 0, world_size: int = 1,
                   resume: Callable[[Path], Path | None] | None = None) -> dict:
    """Runs (or resumes) one run's training loop in this process and returns its final metrics.

    Args:
        config: the run config (plain dict) or its settings.
        report: ``(metrics, checkpoint_dir | None)`` at each report point; it must persist
            the checkpoint folder before returning (the folder is deleted afterwards).
        device: this rank's device.
        rank / world_size: data-parallel position.
        resume: optional ``scratch_dir -> checkpoint folder or None``: where to resume from
            (it may copy a checkpoint into the scratch folder it is given).
    """
    settings = config if isinstance(config, RunSettings) else RunSettings.from_config(config)
    scratch = Path(tempfile.mkdtemp(prefix=f"medalign-rank{rank}-"))
    logger = None
    events = StoragePath(settings.run.log_dir) if settings.run.log_dir else None
    remote_events = events is not None and events.is_remote

    def push_events() -> None:
        """Uploads the events written so far (remote log_dir only)."""
        if logger is not None and remote_events:
            logger.writer.flush()
            events.upload(scratch / "tensorboard")

    def report_then_delete(metrics: dict, checkpoint_dir: Path | None) -> None:
        if checkpoint_dir is not None:
            seal_checkpoint(checkpoint_dir)  # the loop wrote predictions.json after saving
        report(metrics, checkpoint_dir)
        if checkpoint_dir is not None:  # persisted by the caller's report
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
            push_events()

    with output_to_file(console_log_path(settings.run.console_log, rank)):
        try:
            resume_from = resume(scratch) if resume is not None else None
            if rank == 0 and settings.tensorboard.enabled:
                from .tb_logger import RunLogger

                log_dir = scratch / "tensorboard" if remote_events else Path(settings.run.log_dir)
                logger = RunLogger(log_dir, settings.to_dict(), purge_step=_purge_step(log_dir, resume_from))
            return run_training(settings, RunContext(
                report=report_then_delete, resume_from=resume_from, rank=rank, world_size=world_size, device=device,
                scratch_dir=scratch, logger=logger, after_step=kill_hook(rank)))
        finally:
            if logger is not None:
                logger.close()
                push_events()
            shutil.rmtree(scratch, ignore_errors=True)


def _purge_step(log_dir: Path, resume_from: Path | None) -> int | None:
    """Events at steps >= this one, written by a process that died, are hidden by TensorBoard:
    the resumed checkpoint's step + 1, or 0 when a run restarts from scratch over old events."""
    if resume_from is not None:
        return max(checkpoint_step(resume_from) + 1, 0)
    return 0 if log_dir.is_dir() and any(log_dir.glob("*tfevents*")) else None


def console_log_path(path: str | None, rank: int) -> Path | None:
    """``run.console_log`` for this rank: the file itself for rank 0, ``<stem>-rank<N><suffix>`` beside it.

    None when unset or not a local path (a remote trial folder: the output stays on the console)."""
    if not path or "://" in str(path):
        return None
    path = Path(path)
    return path if rank == 0 else path.with_name(f"{path.stem}-rank{rank}{path.suffix}")
