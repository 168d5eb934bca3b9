"""``medalign train`` and the driver prologue every Ray entry point shares.

Everything that can fail on bad input (config types, paths, the distillation layer) fails
here, on the driver, before any Ray resource is requested: :func:`resolve_run_settings`.
:func:`driver_prologue` then does what ``medalign train`` and ``medalign sweep`` both need
before they launch: teacher targets computed once into the shared cache (every worker and
trial only reads it), Ray started or joined (:mod:`.cluster`: ``ray.address:
null`` is a new local cluster, a dead address fails in seconds), and the output path
checked for the cluster. :func:`check_selection_metrics` checks the metrics a sweep selects
on against what the evaluation of the data reports.

``medalign train`` refuses a run folder that already holds a run unless ``resume=true``
(then Ray Train continues it from its last checkpoint) or a new ``run.name``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence

from ..common.errors import ConfigError
from ..common.overrides import parse_overrides, split_overrides, texts
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


def ensure_ray(settings: RunSettings, quiet: bool = False) -> None:
    """Starts (or joins) Ray with worker env vars that keep the hub offline and imports working.

    ``ray.address: null`` starts a new local cluster (or joins ``$RAY_ADDRESS``, as a
    submitted job does); any address is probed first, so a dead one fails within seconds.

    ``quiet`` (a sweep's quiet console) keeps Tune's and Train's INFO lines of the worker
    processes off the driver's console.

    Raises:
        ClusterError: nothing answers at the address, naming it and where it came from.
    """
    import ray

    from .cluster import check_reachable, ray_init_address
    from .network import loopback_cluster
    from .ray_train import train_control_env, worker_env

    control = train_control_env(settings.ray)
    for key, value in control.items():  # the driver's own TorchTrainer.fit reads them here
        os.environ.setdefault(key, value)
    if not ray.is_initialized():
        env_vars = {**worker_env(), **control}
        for key in _job_env_vars():  # a submitted job's own settings win, and Ray refuses to merge duplicates
            env_vars.pop(key, None)
        address, origin = ray_init_address(settings.ray.address)
        check_reachable(address, origin)
        runtime_env: dict = {"env_vars": env_vars}
        if quiet:
            runtime_env["worker_process_setup_hook"] = "medalign_platform.common.console.quiet_ray_worker"
        # Passed only to turn it off: Ray's default (None) starts it and tolerates its failure.
        options = {} if settings.ray.include_dashboard else {"include_dashboard": False}  # ignored when joining
        with loopback_cluster(address):  # a cluster of our own serves nothing to other machines
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=True, configure_logging=False, **options)


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


def check_selection_metrics(settings: RunSettings, metrics: dict[str, str]) -> None:
    """Checks that each ``{setting: "val/<name>"}`` a sweep selects on is reported by the evaluation
    of this run's data (read without decoding images); runs before anything is written or started.

    Raises:
        ConfigError: naming the setting, the metric and the valid choices.
    """
    import dataclasses

    from ..data.splits import load_split
    from .evaluation import check_metric_names

    data = dataclasses.replace(settings.data, validate_images=False)  # the driver prologue decodes them later
    splits = {split: load_split(data, split) for split in sorted({m.split("/", 1)[0] for m in metrics.values()})
              if split in ("val", "test")}
    check_metric_names(metrics, splits, radgraph=bool(settings.data.radgraph_model))


def driver_prologue(settings: RunSettings, *, output_dir: str, setting: str, quiet: bool = False) -> dict:
    """Targets into the shared cache, Ray up, the output path checked; returns the cache counters.

    Args:
        settings: the checked run settings (a sweep's base config).
        output_dir: where results go (``run.output_dir`` or ``sweep.output_dir``).
        setting: that key's name, for the storage warnings.
        quiet: a quiet console (:func:`ensure_ray`).
    """
    from ..data.splits import SPLITS, load_split
    from .evaluation import precompute_targets
    from .storage import warn_storage

    cache = {split: precompute_targets(settings.teacher, load_split(settings.data, split)) for split in SPLITS}
    ensure_ray(settings, quiet=quiet)
    # After ensure_ray: the node count decides whether a local output_dir is a problem.
    warn_storage(output_dir, settings.ray.address, setting=setting)
    return cache


def split_resume(overrides: Sequence[str]) -> tuple[bool, list[str]]:
    """``resume=true|false`` taken out of ``medalign train``'s overrides: ``(resume, the rest)``.

    Raises:
        ConfigError: ``resume`` is not true or false.
    """
    mine, rest = split_overrides(parse_overrides(list(overrides)), lambda key: key == "resume")
    resume = False
    for override in mine:
        if not isinstance(override.value, bool):
            raise ConfigError(f"resume must be true or false, got {override.value!r}")
        resume = override.value
    return resume, texts(rest)


def check_run_folder(run_dir: StoragePath, resume: bool) -> None:
    """Refuses to start a new run in a folder that already holds one (two runs would mix their events).

    Raises:
        ConfigError: the folder holds files and ``resume`` is false.
    """
    # A folder holding only config.json is a start that failed its checks: nothing to lose.
    if not resume and run_dir.is_dir() and any(p.name != CONFIG_FILE for p in run_dir.iterdir()):
        raise ConfigError(f"{run_dir} already holds a run (run.name={run_dir.name!r}); pass resume=true to continue it "
                          f"from its last checkpoint, or choose a new run.name")


def train_run(overrides: Sequence[str] = (), settings: RunSettings | None = None, resume: bool | None = None) -> dict:
    """Runs (or with ``resume=true`` continues) one MedAlign training on Ray Train and returns its summary."""
    from .cluster import check_fits, worker_resources
    from .ray_train import build_trainer

    if resume is None:
        resume, overrides = split_resume(overrides)
    settings = settings or resolve_run_settings(overrides)
    settings.run.output_dir = normalize(settings.run.output_dir)  # absolute, for Ray's storage path and the records
    run_dir = StoragePath(settings.run_location)  # a local folder or a URI (s3://...)
    check_run_folder(run_dir, resume)
    cache = driver_prologue(settings, output_dir=settings.run.output_dir, setting="run.output_dir")
    ray_cfg = settings.ray
    check_fits(worker_resources(ray_cfg.resources_per_worker, ray_cfg.use_gpu), ray_cfg.num_workers,
               "ray.resources_per_worker")
    (run_dir / CONFIG_FILE).write_json(settings.to_dict())
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
