"""``medalign train`` and the driver prologue every Ray entry point shares.

Everything that can fail on bad input (config types, paths, the distillation layer) fails
here, on the driver, before any Ray resource is requested: :func:`resolve_run_settings`.
:func:`driver_prologue` then does what ``medalign train`` and ``medalign sweep`` both need
before they launch: teacher targets computed once into the shared cache (every worker and
trial only reads it), Ray started or joined, and the output path checked for the cluster.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence

from .compose import compose_config
from .filesystems import StoragePath, join, normalize
from .settings import RunSettings

CONFIG_FILE = "config.json"    # the run's complete resolved config, in its folder
SUMMARY_FILE = "summary.json"  # what `medalign train` printed


def resolve_run_settings(overrides: Sequence[str] = (), config: dict | None = None,
                         default_name: str | None = None) -> RunSettings:
    """Composes (or takes) the config, types it, fills the run's name and folders, checks the paths.

    Args:
        overrides: Hydra-style overrides (``experiment=synthmed_vqa trainer.max_steps=50``).
        config: an already composed config dict (then ``overrides`` are not used).
        default_name: ``run.name`` when the config leaves it null (default ``run-<time>``).
    """
    settings = RunSettings.from_config(config if config is not None else compose_config(overrides))
    run = settings.run
    run.name = run.name or default_name or f"run-{time.strftime('%Y%m%d-%H%M%S')}"
    run.log_dir = run.log_dir or join(settings.run_location, "tensorboard")  # absolute: workers run elsewhere
    settings.check_paths()
    return settings


def ensure_ray(settings: RunSettings) -> None:
    """Starts (or joins) Ray with worker env vars that keep the hub offline and imports working."""
    import ray

    from .network import loopback_cluster
    from .ray_train import train_control_env, worker_env

    control = train_control_env(settings.ray)
    for key, value in control.items():  # the driver's own TorchTrainer.fit reads them here
        os.environ.setdefault(key, value)
    if not ray.is_initialized():
        env_vars = {**worker_env(), **control}
        for key in _job_env_vars():  # a submitted job's own settings win, and Ray refuses to merge duplicates
            env_vars.pop(key, None)
        with loopback_cluster(settings.ray.address):  # a cluster of our own serves nothing to other machines
            ray.init(address=settings.ray.address, runtime_env={"env_vars": env_vars},
                     log_to_driver=True, configure_logging=False)


def _job_env_vars() -> dict:
    """The ``env_vars`` of the runtime env of the Ray job this driver runs in (``{}`` outside a job).

    Ray merges the job's runtime env with the one passed to ``ray.init`` and fails
    ("Failed to merge the Job's runtime env") when both set the same variable.
    """
    from .storage import JOB_CONFIG_ENV

    try:
        job = json.loads(os.environ.get(JOB_CONFIG_ENV) or "{}") or {}
    except ValueError:
        return {}
    return dict((job.get("runtime_env") or {}).get("env_vars") or {})


def driver_prologue(settings: RunSettings, *, output_dir: str, setting: str) -> dict:
    """Targets into the shared cache, Ray up, the output path checked; returns the cache counters.

    Args:
        settings: the checked run settings (a sweep's base config).
        output_dir: where results go (``run.output_dir`` or ``sweep.output_dir``).
        setting: that key's name, for the storage warnings.
    """
    from ..data.splits import SPLITS, load_split
    from .evaluation import precompute_targets
    from .storage import warn_storage

    cache = {split: precompute_targets(settings.teacher, load_split(settings.data, split)) for split in SPLITS}
    ensure_ray(settings)
    # After ensure_ray: the node count decides whether a local output_dir is a problem.
    warn_storage(output_dir, settings.ray.address, setting=setting)
    return cache


def train_run(overrides: Sequence[str] = (), settings: RunSettings | None = None) -> dict:
    """Runs one MedAlign training on Ray Train and returns its summary."""
    from .ray_train import build_trainer

    settings = settings or resolve_run_settings(overrides)
    settings.run.output_dir = normalize(settings.run.output_dir)  # absolute, for Ray's storage path and the records
    run_dir = StoragePath(settings.run_location)  # a local folder or a URI (s3://...)
    (run_dir / CONFIG_FILE).write_json(settings.to_dict())
    cache = driver_prologue(settings, output_dir=settings.run.output_dir, setting="run.output_dir")
    result = build_trainer(settings).fit()
    if result.error is not None:
        raise result.error
    summary = {
        "run_dir": str(run_dir),
        "tensorboard": settings.run.log_dir,
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "metrics": {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float, str))},
        "target_cache": cache,
    }
    (run_dir / SUMMARY_FILE).write_json(summary)
    return summary
