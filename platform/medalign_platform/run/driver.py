"""``medalign train``: compose, validate and prepare on the driver, then fit on Ray Train."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from .compose import compose_config, dump_config, validate_run_config


def resolve_run_config(overrides: Sequence[str]) -> dict:
    """Composes the config, fills run defaults (name, log dir) and validates it."""
    config = compose_config(overrides)
    run = config["run"]
    if not run.get("name"):
        run["name"] = f"run-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(run["output_dir"]).expanduser().resolve() / run["name"]
    run["output_dir"] = str(Path(run["output_dir"]).expanduser().resolve())
    run.setdefault("log_dir", str(run_dir / "tensorboard"))
    validate_run_config(config)
    return config


def ensure_ray(config: dict) -> None:
    """Starts (or joins) Ray with worker env vars that keep the hub offline and imports working."""
    import os

    import ray

    from .ray_train import train_control_env, worker_env

    control = train_control_env(config["ray"])
    for key, value in control.items():  # the driver's own TorchTrainer.fit reads them here
        os.environ.setdefault(key, value)
    if not ray.is_initialized():
        env_vars = {**worker_env(), **control}
        for key in _job_env_vars():  # a submitted job's own settings win, and Ray refuses to merge duplicates
            env_vars.pop(key, None)
        ray.init(address=config["ray"].get("address"), runtime_env={"env_vars": env_vars},
                 log_to_driver=True, configure_logging=False)


def _job_env_vars() -> dict:
    """The ``env_vars`` of the runtime env of the Ray job this driver runs in (``{}`` outside a job).

    Ray merges the job's runtime env with the one passed to ``ray.init`` and fails
    ("Failed to merge the Job's runtime env") when both set the same variable.
    """
    import json
    import os

    from .storage import JOB_CONFIG_ENV

    try:
        job = json.loads(os.environ.get(JOB_CONFIG_ENV) or "{}") or {}
    except ValueError:
        return {}
    return dict((job.get("runtime_env") or {}).get("env_vars") or {})


def train_run(overrides: Sequence[str], config: dict | None = None) -> dict:
    """Runs one MedAlign training on Ray Train and returns its summary.

    Everything that can fail on bad input (config, paths, layer range) fails here, before
    any Ray resource is requested; teacher targets are computed once into the shared cache.
    """
    from .evaluation import load_split, precompute_targets
    from .ray_train import build_trainer
    from .storage import warn_storage

    config = config or resolve_run_config(overrides)
    run_dir = Path(config["run"]["output_dir"]) / config["run"]["name"]
    dump_config(config, run_dir / "config.json")
    cache = {split: precompute_targets(config["teacher"], load_split(config["data"], split))
             for split in ("train", "val", "test")}
    ensure_ray(config)
    # After ensure_ray: the node count decides whether a local output_dir is a problem.
    warn_storage(config["run"]["output_dir"], config["ray"].get("address"), setting="run.output_dir")
    result = build_trainer(config).fit()
    if result.error is not None:
        raise result.error
    summary = {
        "run_dir": str(run_dir),
        "tensorboard": config["run"]["log_dir"],
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "metrics": {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float, str))},
        "target_cache": cache,
    }
    dump_config(summary, run_dir / "summary.json")
    return summary
