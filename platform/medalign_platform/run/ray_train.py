"""One MedAlign run on Ray Train V2: the worker function and the ``TorchTrainer`` that runs it.

The driver resolves and validates the config, fills the shared teacher-target cache, and
passes the plain dict to :func:`train_loop_per_worker` through ``train_loop_config``.
Workers call :func:`medalign_platform.run.loop.run_training` with a :class:`RunContext`
whose ``report`` is ``ray.train.report``; a restarted worker group (``FailureConfig``)
resumes from ``ray.train.get_checkpoint()`` at the same step.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from pathlib import Path

from .loop import RunContext, run_training


KILL_ENV = "MEDALIGN_TEST_KILL"


def kill_hook(rank: int):
    """Fault injection for tests: ``MEDALIGN_TEST_KILL=RANK:STEP:MARKER`` SIGKILLs that
    worker's own process once, right after STEP, and leaves MARKER so it happens only once."""
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


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker entry point: runs (or resumes) the training loop on this rank."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank = context.get_world_rank()
    scratch = Path(tempfile.mkdtemp(prefix=f"medalign-rank{rank}-"))
    checkpoint = ray.train.get_checkpoint()
    resume_from = None
    if checkpoint is not None:
        resume_from = Path(checkpoint.to_directory(str(scratch / "resume")))

    def report(metrics: dict, checkpoint_dir: Path | None) -> None:
        ray_checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ray_checkpoint)
        if checkpoint_dir is not None:  # persisted by Ray; the local copy is no longer needed
            shutil.rmtree(checkpoint_dir, ignore_errors=True)

    logger = None
    if rank == 0 and config.get("tensorboard", {}).get("enabled", True):
        from .tb_logger import RunLogger

        logger = RunLogger(Path(config["run"]["log_dir"]), config)
    try:
        run_training(
            config,
            RunContext(
                report=report,
                resume_from=resume_from,
                rank=rank,
                world_size=context.get_world_size(),
                device=ray.train.torch.get_device(),
                scratch_dir=scratch,
                logger=logger,
                after_step=kill_hook(rank),
            ),
        )
    finally:
        if logger is not None:
            logger.close()
        shutil.rmtree(scratch, ignore_errors=True)


def build_trainer(config: dict, *, callbacks: list | None = None):
    """A ``TorchTrainer`` for one run, from a resolved and validated config."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray_cfg = config["ray"]
    run_cfg = config["run"]
    storage = Path(run_cfg["output_dir"]).expanduser().resolve()
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=int(ray_cfg["num_workers"]),
            use_gpu=bool(ray_cfg["use_gpu"]),
            resources_per_worker=dict(ray_cfg.get("resources_per_worker") or {}),
        ),
        run_config=RunConfig(
            name=run_cfg["name"],
            storage_path=str(storage),
            checkpoint_config=CheckpointConfig(
                num_to_keep=ray_cfg.get("num_to_keep"),
                checkpoint_score_attribute=ray_cfg.get("checkpoint_score"),
                checkpoint_score_order=ray_cfg.get("checkpoint_mode", "max"),
            ),
            failure_config=FailureConfig(max_failures=int(ray_cfg.get("max_failures", 0))),
            callbacks=callbacks,
        ),
    )


POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def train_control_env(ray_cfg: dict) -> dict:
    """Ray Train controller settings from ``ray.controller_poll_s`` / ``ray.preemption_watcher``.

    Ray Train V2 reads them from environment variables of the process that calls ``fit``
    (and forwards them to its controller and workers). The controller polls its workers
    every ``controller_poll_s`` seconds, so Ray's 2 s default adds up to 2 s to the start
    and the end of every run; a poll is one cheap actor call, so 0.2 s costs nothing
    measurable. The preemption watcher is one more actor (one more process start) per run;
    it only matters on clusters with preemptible nodes, so ``auto`` keeps it for runs that
    join a cluster (``ray.address`` set) and drops it for local ones. Variables already set
    in the environment win.

    Raises:
        ConfigError: a poll interval that is not a positive number, or an unknown watcher mode.
    """
    from .compose import ConfigError

    poll = ray_cfg.get("controller_poll_s", 0.2)
    if isinstance(poll, bool) or not isinstance(poll, (int, float)) or not 0 < poll <= 60:
        raise ConfigError(f"ray.controller_poll_s must be a number of seconds in (0, 60], got {poll!r}")
    watcher = ray_cfg.get("preemption_watcher", "auto")
    if watcher not in ("auto", True, False):
        raise ConfigError(f"ray.preemption_watcher must be auto, true or false, got {watcher!r}")
    if watcher == "auto":
        watcher = bool(ray_cfg.get("address"))
    env = {POLL_ENV: str(float(poll)), WATCHER_ENV: "1" if watcher else "0"}
    return {key: os.environ.get(key, value) for key, value in env.items()}


def worker_env() -> dict:
    """Environment for Ray workers: offline hub, quiet tokenizers, this source tree importable."""
    source_root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (source_root, os.environ.get("PYTHONPATH", "")) if p)
    env = {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": path}
    env.update({k: v for k, v in os.environ.items() if k.startswith("MEDALIGN_")})
    return env
