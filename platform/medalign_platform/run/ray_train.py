"""One MedAlign run on Ray Train V2: the worker function and the ``TorchTrainer`` that runs it.

The driver resolves and checks the config, fills the shared teacher-target cache, and
passes the plain dict to :func:`train_loop_per_worker` through ``train_loop_config``.
Workers run it with :func:`medalign_platform.run.runner.run_in_process`, reporting through
``ray.train.report``; a restarted worker group (``FailureConfig``) resumes from
``ray.train.get_checkpoint()`` at the same step, or from a newer complete checkpoint in the
run's folder: a worker killed right after a report can die before the controller records
that checkpoint in its snapshot (:func:`resume_source`).
"""

from __future__ import annotations

import os
from pathlib import Path

from .filesystems import normalize
from .settings import RaySettings, RunSettings

POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker entry point: runs (or resumes) the training loop on this rank."""
    import ray.train
    import ray.train.torch

    from .runner import run_in_process

    context = ray.train.get_context()
    checkpoint = ray.train.get_checkpoint()

    def report(metrics: dict, checkpoint_dir: Path | None) -> None:
        ray_checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ray_checkpoint)

    run = config.get("run", {})
    resume = resume_source(checkpoint, Path(run.get("output_dir", ".")) / str(run.get("name")))
    run_in_process(config, report, device=ray.train.torch.get_device(), rank=context.get_world_rank(),
                   world_size=context.get_world_size(), resume=resume)


def resume_source(checkpoint, run_dir: Path):
    """Where a (re)started worker resumes from: ``scratch -> folder``, or None to start from scratch.

    Ray's checkpoint (the newest its controller recorded), unless the run's folder holds a
    newer complete one (verified against its manifest; a partial copy is skipped with a
    warning): Ray persists a reported checkpoint before its controller records it, so a
    worker group that dies in between would otherwise redo those steps. Only a run folder on
    a local or mounted filesystem is looked at.
    """
    from .checkpoint import checkpoint_step, complete_checkpoints

    ray_step, ray_local = -1, None
    if checkpoint is not None:
        local_fs = getattr(getattr(checkpoint, "filesystem", None), "type_name", "local") == "local"
        ray_local = Path(checkpoint.path) if local_fs else None
        ray_step = checkpoint_step(ray_local) if ray_local is not None else -1
    on_disk = [pair for pair in complete_checkpoints(run_dir, "checkpoint_*") if pair[0] >= 0] \
        if run_dir.is_dir() else []
    newest = max(on_disk, key=lambda pair: pair[0], default=None)
    if newest is not None and newest[0] > ray_step:
        return lambda scratch: newest[1]
    if checkpoint is None:
        return None
    return lambda scratch: Path(checkpoint.to_directory(str(scratch / "resume")))


def build_trainer(settings: RunSettings, *, callbacks: list | None = None):
    """A ``TorchTrainer`` for one run, from its checked settings."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray_cfg = settings.ray
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=settings.to_dict(),
        scaling_config=ScalingConfig(num_workers=ray_cfg.num_workers, use_gpu=ray_cfg.use_gpu,
                                     resources_per_worker=dict(ray_cfg.resources_per_worker)),
        run_config=RunConfig(
            name=settings.run.name,
            storage_path=normalize(settings.run.output_dir),  # a local folder or a URI (s3://...)
            checkpoint_config=CheckpointConfig(num_to_keep=ray_cfg.num_to_keep,
                                               checkpoint_score_attribute=ray_cfg.checkpoint_score,
                                               checkpoint_score_order=ray_cfg.checkpoint_mode),
            failure_config=FailureConfig(max_failures=ray_cfg.max_failures),
            callbacks=callbacks,
        ),
    )


def train_control_env(ray_cfg: RaySettings) -> dict:
    """Ray Train controller settings from ``ray.controller_poll_s`` / ``ray.preemption_watcher``.

    Ray Train V2 reads them from environment variables of the process that calls ``fit``
    (and forwards them to its controller and workers). The controller polls its workers
    every ``controller_poll_s`` seconds, so Ray's 2 s default adds up to 2 s to the start
    and the end of every run; a poll is one cheap actor call, so 0.2 s costs nothing
    measurable. The preemption watcher is one more actor (one more process start) per run;
    it only matters on clusters with preemptible nodes, so ``auto`` keeps it for runs that
    join a cluster (``ray.address`` set) and drops it for local ones. Variables already set
    in the environment win.
    """
    watcher = ray_cfg.preemption_watcher
    if watcher == "auto":
        watcher = bool(ray_cfg.address)
    env = {POLL_ENV: str(float(ray_cfg.controller_poll_s)), WATCHER_ENV: "1" if watcher else "0"}
    return {key: os.environ.get(key, value) for key, value in env.items()}


def worker_env() -> dict:
    """Environment for Ray workers: offline hub, quiet tokenizers, this source tree importable."""
    source_root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (source_root, os.environ.get("PYTHONPATH", "")) if p)
    env = {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": path}
    env.update({k: v for k, v in os.environ.items() if k.startswith("MEDALIGN_")})
    return env
