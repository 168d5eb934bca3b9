"""``medalign sweep``: Ray Tune + Optuna over a search space, each trial a Ray Train run.

``run_sweep(["experiment=synthmed_vqa", "search=medalign_default", "sweep.num_samples=16"])``

* ``search=NAME`` picks ``search_spaces/NAME.yaml`` (:mod:`medalign_platform.tune.search_space`);
  ``sweep.*`` keys (see :data:`SWEEP_DEFAULTS`) and ``resume=true`` configure the sweep;
  every other override goes to the base run config (composed and validated like
  ``medalign train``). The space is validated against that config and the model before
  Ray starts.
* Each trial is the function :func:`sweep_trial`: it sets the sampled keys (and derived
  rules) on the base config, validates it again, builds the run's ``TorchTrainer``
  (1 worker by default) and reports every evaluation to Tune through
  ``TuneReportCallback``. Training-only reports stay in the trial's TensorBoard.
  ``sweep.executor=inline`` runs the same training loop inside the trial process instead
  (one worker, Tune checkpoints, Tune retries): no Train controller, worker actor and
  process group per trial. The default, ``auto``, picks inline for single-worker trials
  and Ray Train for multi-worker (DDP) ones: a Ray Train run costs ~10-25 s of actor and
  process-group start-up per trial on a 2-core machine, inline about 1-3 s
  (``benchmarks/sweep_overhead.py``), and one worker gains nothing from Train's worker
  group. ``sweep.executor=train`` forces Ray Train trials.
* Resources: ``sweep.trial_resources`` (e.g. ``{CPU: 1, GPU: 0.5}``) per trial worker.
  With Ray Train trials the workers hold them and the trial actor holds none, so
  ``max_concurrent`` is capped to what a local cluster fits; inline trials hold them
  through ``tune.with_resources``. ASHA with Ray Train trials needs the Ray dashboard
  (state API): Train's placement-group cleaner uses it to free a stopped trial's workers.
* Search: Optuna (``OptunaSearch``) with TPE (default), random, CMA-ES, NSGA-II or a
  grid sampler, seeded by ``sweep.seed``; seed points from the space's
  ``points_to_evaluate`` run first. The study lives in ``EXP_DIR/optuna.db`` (SQLite,
  study name = sweep name), so ``optuna.load_study`` opens it while and after it runs.
* Early stopping: ASHA on the training step (``time_attr="step"``). Multi-objective
  sweeps (``sweep.metrics=[a,b]``) run without it: ASHA ranks trials on one metric.
* Resume: ``resume=true`` restores the Tune experiment (``Tuner.restore``). Finished
  trials stay finished; unfinished ones restart and their Ray Train run resumes from its
  last checkpoint in the trial directory; a trial whose training had already finished
  reports its recorded final metrics without training again; the searcher continues
  from its saved state and the SQLite study.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..common.atomic import write_text_atomic
from ..run.compose import ConfigError, compose_config, validate_run_config
from .search_space import SearchSpace, SearchSpaceError, load_search_space

logger = logging.getLogger(__name__)

SWEEP_SPEC_FILE = "sweep.json"        # settings + base config + search space, for resume and status
SUMMARY_FILE = "summary.json"         # what run_sweep returned, plus one record per trial
FINAL_FILE = "final.json"             # per trial: final metrics and timings of its finished run
STUDY_FILE = "optuna.db"
TRAIN_RUN_NAME = "train"              # the Ray Train run's folder inside each trial folder
TRIAL_ACTOR_MEMORY = 2**20            # bytes of Ray's memory resource held by each trial actor
TUNE_STATE_PERIOD_ENV = "TUNE_GLOBAL_CHECKPOINT_S"  # how often Tune saves its experiment state
TUNE_STATE_PERIOD_S = "1"
META_KEY = "_sweep"                   # reserved top-level key of a trial config: rules and metrics

SWEEP_DEFAULTS: dict = {
    "name": None,                 # experiment folder name (default: <run.name>-<search>)
    "output_dir": "sweeps",       # experiments live in output_dir/name
    "num_samples": None,          # trials (default 8; the grid size for sweep.sampler=grid)
    "max_concurrent": 2,          # trials at once (capped by a local cluster's resources)
    "metric": "val/closed_accuracy",
    "mode": "max",
    "metrics": None,              # [m1, m2, ...]: multi-objective (Optuna), no ASHA
    "modes": None,                # [max, min, ...] for metrics (default: sweep.mode for each)
    "sampler": None,              # tpe | random | cmaes | nsga2 | grid (default: grid for grid spaces, else tpe)
    "seed": 0,                    # seeds the sampler
    "n_startup_trials": None,     # TPE random start-up trials (default: num_samples // 4, within 2..10)
    "asha": {"enabled": True, "grace_period": None, "reduction_factor": 3, "max_t": None},
    "trial_resources": None,      # per trial worker, e.g. {CPU: 1, GPU: 0.5} (default: ray.resources_per_worker)
    "num_workers": 1,             # Ray Train workers per trial
    "executor": "auto",           # train: each trial a Ray Train run | inline: the loop in the trial actor
                                  # auto: inline for 1-worker trials, train for multi-worker (DDP) ones
    "resume": False,              # same as resume=true
    "resume_errored": False,      # on resume, continue errored trials from their checkpoints
    "restart_errored": False,     # on resume, restart errored trials from scratch
    "verbose": 1,                 # Tune console verbosity 0..2
}
SAMPLERS = ("tpe", "random", "cmaes", "nsga2", "grid")


# --------------------------------------------------------------------------- settings


@dataclass
class SweepSettings:
    """The ``search=``, ``resume=`` and ``sweep.*`` part of the overrides."""

    search: str
    name: str
    output_dir: str
    num_samples: int
    max_concurrent: int
    metrics: list[str]
    modes: list[str]
    sampler: str
    seed: int
    n_startup_trials: int
    asha: dict
    trial_resources: dict
    num_workers: int
    executor: str
    resume: bool
    resume_errored: bool
    restart_errored: bool
    verbose: int
    config_overrides: list[str] = field(default_factory=list)

    @property
    def multi_objective(self) -> bool:
        return len(self.metrics) > 1

    @property
    def experiment_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    @property
    def storage_url(self) -> str:
        return f"sqlite:///{self.experiment_dir / STUDY_FILE}"

    @property
    def asha_enabled(self) -> bool:
        return bool(self.asha.get("enabled", True)) and not self.multi_objective

    def to_dict(self) -> dict:
        return {k: copy.deepcopy(v) for k, v in self.__dict__.items()}


def split_overrides(overrides: Sequence[str]) -> tuple[dict, list[str]]:
    """Separates ``search=``/``resume=``/``sweep.*`` (parsed, Hydra-typed) from run-config overrides."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    sweep: dict = {}
    rest: list[str] = []
    parser = OverridesParser.create()
    for text in overrides:
        key = text.split("=", 1)[0].lstrip("+~")
        if key not in ("search", "resume") and not key.startswith("sweep."):
            rest.append(text)
            continue
        try:
            (parsed,) = parser.parse_overrides([text.lstrip("+~")])
        except HydraException as error:
            raise ConfigError(f"cannot parse override {text!r}: {error}") from error
        value = parsed.value()
        if key == "search":
            sweep["search"] = value
        elif key == "resume":
            sweep.setdefault("sweep", {})["resume"] = value
        else:
            node = sweep.setdefault("sweep", {})
            *parents, last = key.split(".")[1:]
            for part in parents:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"override {text!r}: sweep.{part} is not a section")
            node[last] = value
    return sweep, rest


def _merge(defaults: dict, given: dict, where: str) -> dict:
    out = copy.deepcopy(defaults)
    for key, value in given.items():
        if key not in defaults:
            raise ConfigError(f"unknown sweep setting {where}{key}; valid: {sorted(defaults)}")
        if isinstance(defaults[key], dict) and key != "trial_resources":
            if not isinstance(value, dict):
                example = f"{where}{key}.{next(iter(defaults[key]))}=..."
                raise ConfigError(f"{where}{key} is a section; set its keys, e.g. {example}")
            out[key] = _merge(defaults[key], value, f"{where}{key}.")
        else:
            out[key] = value
    return out


def sweep_settings(parsed: dict, base_config: dict, space: SearchSpace,
                   config_overrides: Sequence[str]) -> SweepSettings:
    """Fills defaults and checks the ``sweep.*`` values (before any Ray resource is requested)."""
    values = _merge(SWEEP_DEFAULTS, parsed.get("sweep", {}), "sweep.")
    search = parsed.get("search")
    metrics = values["metrics"]
    if metrics is None:
        metrics = [values["metric"]]
    if isinstance(metrics, str):
        metrics = [metrics]
    if not metrics or not all(isinstance(m, str) and m for m in metrics):
        raise ConfigError(f"sweep.metrics must be a list of metric names like [val/closed_accuracy, val/grounding], "
                          f"got {metrics!r}")
    modes = values["modes"]
    if modes is None:
        modes = [values["mode"]] * len(metrics)
    if isinstance(modes, str):
        modes = [modes] * len(metrics)
    if len(modes) != len(metrics) or any(m not in ("min", "max") for m in modes):
        raise ConfigError(f"sweep.modes must be min or max, one per metric ({metrics}), got {modes!r}")
    for metric in metrics:
        if not metric.startswith(("val/", "test/")):
            raise ConfigError(
                f"sweep metric {metric!r} is not an evaluation metric; trials report val/* at each evaluation "
                f"(e.g. val/closed_accuracy, val/open_recall, val/grounding)"
            )

    sampler = values["sampler"] or ("grid" if space.has_grid else "tpe")
    if sampler not in SAMPLERS:
        raise ConfigError(f"sweep.sampler={sampler!r}; valid: {list(SAMPLERS)}")
    if space.has_grid and sampler != "grid":
        raise SearchSpaceError(
            f"{space.source}: grid entries need sweep.sampler=grid (got {sampler}); use type choice for a sampled "
            f"categorical"
        )
    if sampler == "grid":
        space.grid_size()  # raises naming a continuous entry
    if len(metrics) > 1 and sampler == "cmaes":
        raise ConfigError("sweep.sampler=cmaes is single-objective; use tpe, random or nsga2 with sweep.metrics")
    if sampler == "cmaes":
        try:
            import cmaes  # noqa: F401
        except ImportError as error:
            raise ConfigError("sweep.sampler=cmaes needs the `cmaes` package (pip install cmaes); "
                              "or use sweep.sampler=tpe") from error

    num_samples = values["num_samples"]
    if num_samples is None:
        num_samples = space.grid_size() if sampler == "grid" else 8
    for key in ("max_concurrent", "num_workers", "seed", "verbose"):
        if isinstance(values[key], bool) or not isinstance(values[key], int):
            raise ConfigError(f"sweep.{key} must be an integer, got {values[key]!r}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ConfigError(f"sweep.num_samples must be an integer >= 1, got {num_samples!r}")
    if values["max_concurrent"] < 1 or values["num_workers"] < 1:
        raise ConfigError("sweep.max_concurrent and sweep.num_workers must be >= 1")
    n_startup = values["n_startup_trials"]
    if n_startup is None:
        n_startup = min(10, max(2, num_samples // 4))

    trainer = base_config["trainer"]
    asha = dict(values["asha"])
    max_steps = int(trainer["max_steps"])
    first_eval = int(trainer["eval_every"]) or max_steps
    asha["max_t"] = int(asha["max_t"] or max_steps)
    asha["grace_period"] = int(asha["grace_period"] or min(first_eval, max_steps))
    if not 1 <= asha["grace_period"] <= asha["max_t"]:
        raise ConfigError(f"sweep.asha.grace_period={asha['grace_period']} must be in 1..max_t ({asha['max_t']}) steps")
    if not asha["reduction_factor"] > 1:
        raise ConfigError(f"sweep.asha.reduction_factor must be > 1, got {asha['reduction_factor']}")

    resources = values["trial_resources"]
    if resources is None:
        resources = dict(base_config["ray"].get("resources_per_worker") or {"CPU": 1})
        if base_config["ray"].get("use_gpu") and "GPU" not in resources:
            resources["GPU"] = 1
    if not isinstance(resources, dict):
        raise ConfigError(f"sweep.trial_resources must be a mapping like {{CPU: 1, GPU: 0.5}}, got {resources!r}")
    resources = {str(k).upper() if str(k).lower() in ("cpu", "gpu") else str(k): v for k, v in resources.items()}
    for key, amount in resources.items():
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount < 0:
            raise ConfigError(f"sweep.trial_resources.{key} must be a number >= 0, got {amount!r}")
    if 0 < resources.get("GPU", 0) < 1 and values["num_workers"] > 1:
        logger.warning("fractional GPUs with %d workers per trial: each worker gets %s GPU",
                       values["num_workers"], resources["GPU"])

    executor = values["executor"]
    if executor not in ("auto", "train", "inline"):
        raise ConfigError(f"sweep.executor={executor!r}; valid: auto, train (a Ray Train run per trial), inline")
    if executor == "auto":  # see EXECUTORS in the module docstring for the measured trade-off
        executor = "inline" if values["num_workers"] == 1 else "train"
    if executor == "inline" and values["num_workers"] != 1:
        raise ConfigError("sweep.executor=inline runs each trial in one process: it needs sweep.num_workers=1")

    name = values["name"] or f"{base_config['run'].get('name') or 'sweep'}-{Path(str(search)).stem}"
    if "/" in name or name in (".", ".."):
        raise ConfigError(f"sweep.name={name!r} must be a plain folder name")
    return SweepSettings(
        search=str(search), name=name, output_dir=str(Path(values["output_dir"]).expanduser().resolve()),
        num_samples=num_samples, max_concurrent=values["max_concurrent"], metrics=list(metrics), modes=list(modes),
        sampler=sampler, seed=values["seed"], n_startup_trials=int(n_startup), asha=asha, trial_resources=resources,
        num_workers=values["num_workers"], executor=executor, resume=bool(values["resume"]),
        resume_errored=bool(values["resume_errored"]),
        restart_errored=bool(values["restart_errored"]), verbose=values["verbose"],
        config_overrides=list(config_overrides),
    )


def trial_base_config(base_config: dict, settings: SweepSettings, space: SearchSpace) -> dict:
    """The config every trial starts from: the run config, trial scaling, and the rules."""
    config = copy.deepcopy(base_config)
    resources = dict(settings.trial_resources)
    config["ray"].update({
        "num_workers": settings.num_workers,
        "use_gpu": resources.get("GPU", 0) > 0,
        "resources_per_worker": resources,
        "address": None,  # trials run inside the sweep's cluster
    })
    config[META_KEY] = {
        "experiment_dir": str(settings.experiment_dir),
        "executor": settings.executor,
        "rules": [{"key": r.key, "source": r.source, "factor": r.factor, "text": r.text} for r in space.rules.values()],
    }
    return config


def _apply_rules(config: dict, rules: list[dict]) -> dict:
    from .search_space import Rule, get_flat, set_flat

    out = copy.deepcopy(config)
    for item in rules:
        rule = Rule(item["key"], item["source"], float(item["factor"]), item.get("text", ""))
        set_flat(out, rule.key, rule.value(get_flat(out, rule.source)))
    return out


def trial_run_config(trial_config: dict, trial_dir: Path) -> dict:
    """The run config of one trial: rules applied, the sweep metadata removed, run paths set."""
    meta = trial_config.get(META_KEY, {})
    config = _apply_rules({k: v for k, v in trial_config.items() if k != META_KEY}, meta.get("rules", []))
    config["run"] = {**config.get("run", {}), "output_dir": str(trial_dir), "name": TRAIN_RUN_NAME,
                     "log_dir": str(trial_dir / "tensorboard")}
    return config


# --------------------------------------------------------------------------- the trial


def _eval_report_callback():
    """A ``TuneReportCallback`` that forwards only evaluation reports (those with val/ or test/ keys).

    Tune requires the searched metric in every result it receives; training-only reports
    (every ``trainer.log_every`` steps) go to the trial's TensorBoard instead.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    class EvalReportCallback(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics and _is_evaluation(metrics[0]):
                super().after_report(run_context, metrics, checkpoint)

    return EvalReportCallback()


def _scalars(metrics: dict | None) -> dict:
    return {k: v for k, v in (metrics or {}).items()
            if isinstance(v, (int, float, str, bool)) and not (isinstance(v, float) and not math.isfinite(v))}


def _write_json(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True))


def sweep_trial(config: dict) -> None:
    """One Tune trial: the Ray Train run of the base config with this trial's sampled values.

    Restarted trials (a resumed sweep) resume their Ray Train run from the last checkpoint in
    the trial folder; a trial whose training already finished re-reports its final metrics.
    """
    import ray.tune

    started = time.perf_counter()
    trial_dir = trial_folder(config[META_KEY]["experiment_dir"], ray.tune.get_context().get_trial_id())
    trial_dir.mkdir(parents=True, exist_ok=True)
    run_config = trial_run_config(config, trial_dir)
    validate_run_config(run_config)  # the sampled values, against the model and the files
    final_path = trial_dir / FINAL_FILE
    if final_path.is_file():  # finished before the sweep driver stopped: report what it recorded
        ray.tune.report(json.loads(final_path.read_text())["metrics"])
        return
    max_steps = int(run_config["trainer"]["max_steps"])
    run_dir = trial_dir / TRAIN_RUN_NAME
    metrics = _recorded_final_metrics(run_dir, max_steps)
    replayed = metrics is not None
    fit_seconds = 0.0
    prepared = time.perf_counter()
    if replayed:  # training finished but final.json was never written
        ray.tune.report(metrics)
    elif config[META_KEY].get("executor", "train") == "inline":
        tick = prepared = time.perf_counter()

        def record_final(final_metrics: dict) -> None:
            # Written before the last report reaches Tune: ASHA may stop a trial at its last
            # rung (step == max_t), and Tune then ends this process before fit returns.
            _write_json(final_path, _final_record(final_metrics, started, prepared, time.perf_counter() - tick,
                                                  False, run_config))

        metrics, replayed = _fit_inline(run_config, on_final=record_final)
        fit_seconds = time.perf_counter() - tick
    else:
        from ..run.ray_train import build_trainer

        trainer = build_trainer(run_config, callbacks=[_eval_report_callback()])
        tick = prepared = time.perf_counter()
        result = trainer.fit()
        fit_seconds = time.perf_counter() - tick
        if result.error is not None:
            raise result.error
        metrics = _scalars(result.metrics)
    _write_json(final_path, _final_record(metrics, started, prepared, fit_seconds, replayed, run_config))


def _final_record(metrics: dict, started: float, prepared: float, fit_seconds: float, replayed: bool,
                  run_config: dict) -> dict:
    """``final.json`` of a trial: its final metrics and timings (perf_counter seconds)."""
    return {
        "metrics": metrics,
        "trial_wall_s": time.perf_counter() - started,
        "before_fit_s": prepared - started,
        "fit_s": fit_seconds,
        "replayed": replayed,
        "params": {k: v for k, v in _flat(run_config).items() if k.split(".")[0] in ("distill", "lora", "optim")},
    }


def _is_evaluation(metrics: dict) -> bool:
    return any(str(k).startswith(("val/", "test/")) for k in metrics)


def _fit_inline(run_config: dict, on_final=None) -> tuple[dict, bool]:
    """Runs the training loop in this trial process (``sweep.executor=inline``).

    The same :func:`~medalign_platform.run.loop.run_training` as a Ray Train worker runs,
    without a Train controller, worker actor and process group per trial. Checkpoints
    are Tune checkpoints of the trial (each also holds its ``metrics.json``), so a resumed
    sweep continues the trial from its last evaluation.

    Args:
        run_config: the trial's resolved run config.
        on_final: called with the final metrics just before they are reported to Tune.

    Returns:
        the final metrics and whether they were replayed from a finished checkpoint.
    """
    import shutil
    import tempfile

    import ray
    import ray.tune
    import torch

    from ..run.ray_train import kill_hook
    from ..run.loop import RunContext, run_training

    scratch = Path(tempfile.mkdtemp(prefix="medalign-trial-"))
    checkpoint = ray.tune.get_checkpoint()
    # Tune restores a trial from the checkpoint its last saved experiment state names, which
    # can be seconds behind (a killed driver); the trial folder may hold a newer complete one.
    newest = newest_trial_checkpoint(Path(run_config["run"]["output_dir"]))
    tune_step = _checkpoint_step_of(Path(checkpoint.path)) if checkpoint is not None else -1
    resume_from = None
    if newest is not None and newest[0] > tune_step:
        logging.getLogger(__name__).info("resuming from %s (step %d), newer than Tune's restored checkpoint",
                                         newest[1], newest[0])
        resume_from = newest[1]
    elif checkpoint is not None:  # only now copied: the newer local one above needs no copy
        resume_from = Path(checkpoint.to_directory(str(scratch / "resume")))
    if resume_from is not None and (resume_from / "metrics.json").is_file():
        state = json.loads((resume_from / "trainer_state.json").read_text())
        if state["step"] >= int(run_config["trainer"]["max_steps"]):  # finished; only the record was lost
            metrics = json.loads((resume_from / "metrics.json").read_text())
            ray.tune.report(metrics)
            shutil.rmtree(scratch, ignore_errors=True)
            return metrics, True

    max_steps = int(run_config["trainer"]["max_steps"])

    def report(metrics: dict, checkpoint_dir: Path | None) -> None:
        if not _is_evaluation(metrics):
            return  # training scalars go to TensorBoard only (Tune needs the metric in every result)
        if on_final is not None and metrics.get("step", 0) >= max_steps:
            on_final(_scalars(metrics))
        tune_checkpoint = None
        if checkpoint_dir is not None:
            (checkpoint_dir / "metrics.json").write_text(json.dumps(_scalars(metrics)))
            _write_manifest(checkpoint_dir)
            tune_checkpoint = ray.tune.Checkpoint.from_directory(str(checkpoint_dir))
        ray.tune.report(metrics, checkpoint=tune_checkpoint)
        if checkpoint_dir is not None:  # persisted by Tune
            shutil.rmtree(checkpoint_dir, ignore_errors=True)

    use_cuda = bool(ray.get_gpu_ids()) and torch.cuda.is_available()
    logger = None
    if run_config.get("tensorboard", {}).get("enabled", True):
        from ..run.tb_logger import RunLogger

        logger = RunLogger(Path(run_config["run"]["log_dir"]), run_config)
    try:
        metrics = run_training(run_config, RunContext(
            report=report, resume_from=resume_from, device=torch.device("cuda" if use_cuda else "cpu"),
            scratch_dir=scratch, logger=logger, after_step=kill_hook(0)))
    finally:
        if logger is not None:
            logger.close()
        shutil.rmtree(scratch, ignore_errors=True)
    return _scalars(metrics), False


MANIFEST_FILE = "manifest.json"  # {relative path: size} of an inline trial's checkpoint files


def _write_manifest(checkpoint_dir: Path) -> None:
    files = {str(p.relative_to(checkpoint_dir)): p.stat().st_size for p in checkpoint_dir.rglob("*") if p.is_file()}
    (checkpoint_dir / MANIFEST_FILE).write_text(json.dumps(files))


def _checkpoint_step_of(folder: Path | None) -> int:
    if folder is None:
        return -1
    try:
        return int(json.loads((folder / "trainer_state.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return -1


def newest_trial_checkpoint(trial_dir: Path) -> tuple[int, Path] | None:
    """The highest-step complete Tune checkpoint in an inline trial's folder, as (step, path).

    Complete means every file of its manifest is there with its recorded size: a driver
    killed while Tune was copying a checkpoint leaves a partial folder, which is skipped.
    """
    best = None
    for folder in trial_dir.glob("checkpoint_*"):
        try:
            manifest = json.loads((folder / MANIFEST_FILE).read_text())
        except (OSError, ValueError):
            continue
        if not all((folder / name).is_file() and (folder / name).stat().st_size == size
                   for name, size in manifest.items()):
            continue
        step = _checkpoint_step_of(folder)
        if step >= 0 and (best is None or step > best[0]):
            best = (step, folder)
    return best


def _recorded_final_metrics(run_dir: Path, max_steps: int) -> dict | None:
    """Final metrics of the trial's Ray Train run if it already reached ``max_steps`` (else None)."""
    if not (run_dir / "checkpoint_manager_snapshot.json").is_file():
        return None
    from ray.train import Result

    try:
        metrics = Result.from_path(str(run_dir)).metrics or {}
    except (RuntimeError, ValueError, OSError):
        return None
    if int(metrics.get("step", -1)) >= max_steps and any(k.startswith("val/") for k in metrics):
        return _scalars(metrics)
    return None


def _flat(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, f"{name}."))
        else:
            out[name] = value
    return out


def _optuna_search_class():
    """``OptunaSearch`` that tags each study trial with its Tune trial id (user attr
    ``tune_trial_id``) and tolerates results of trials the study already closed: a resumed
    sweep re-reports a trial that finished after Tune's last experiment snapshot."""
    from ray.tune.search.optuna import OptunaSearch

    class SweepOptunaSearch(OptunaSearch):
        def suggest(self, trial_id: str):
            config = super().suggest(trial_id)
            trial = self._ot_trials.get(trial_id)
            if config is not None and trial is not None:
                trial.set_user_attr("tune_trial_id", trial_id)
            return config

        def on_trial_result(self, trial_id: str, result: dict):
            if trial_id not in self._ot_trials:
                return
            try:
                super().on_trial_result(trial_id, result)
            except RuntimeError as error:  # optuna: the trial is already finished in the study
                logger.info("study trial of %s is closed; result not recorded again (%s)", trial_id, error)

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
            if trial_id in self._ot_trials:
                super().on_trial_complete(trial_id, result=result, error=error)

    return SweepOptunaSearch


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def trial_folder(experiment_dir: str | Path, trial_id: str) -> Path:
    """``EXP_DIR/trial_<id>``: the trial's folder in the experiment (not Tune's local staging
    copy, which lives in the Ray session folder and is gone after a restart). Its Ray Train
    run (``train/``: checkpoints, snapshot), TensorBoard events and ``final.json`` live here."""
    return Path(experiment_dir) / f"trial_{trial_id}"


# --------------------------------------------------------------------------- the driver


def _sampler(settings: SweepSettings, space: SearchSpace):
    import optuna

    seed = settings.seed
    if settings.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=settings.n_startup_trials)
    if settings.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if settings.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=settings.n_startup_trials)
    if settings.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    grid = {key.replace(".", "/"): space.grid_values(param) for key, param in space.params.items() if param.sampled}
    return optuna.samplers.GridSampler(grid, seed=seed)


def _study_storage(settings: SweepSettings):
    import optuna

    return optuna.storages.RDBStorage(settings.storage_url, engine_kwargs={"connect_args": {"timeout": 60}})


def _new_points(settings: SweepSettings, points: list[dict]) -> list[dict]:
    """Seed points not yet in an existing study (a sweep restarted before Tune saved any state)."""
    import optuna

    try:
        study = optuna.load_study(study_name=settings.name, storage=_study_storage(settings))
    except KeyError:
        return points
    seen = [t.params or t.system_attrs.get("fixed_params", {}) for t in study.get_trials(deepcopy=False)]
    return [p for p in points if not any(all(s.get(k) == v for k, v in p.items()) for s in seen)]


def _cap_concurrency(settings: SweepSettings, address: str | None) -> int:
    """``max_concurrent`` lowered to what a local cluster can run at once (Tune does not see
    the Train workers' resources: the trial actor itself holds none)."""
    import ray

    wanted = settings.max_concurrent
    if address:
        return wanted
    available = ray.cluster_resources()
    fits = wanted
    for key, amount in settings.trial_resources.items():
        need = amount * settings.num_workers
        if need > 0:
            fits = min(fits, int(available.get(key, 0) // need + 1e-9))
    if fits < 1:
        raise ConfigError(
            f"sweep.trial_resources={settings.trial_resources} x {settings.num_workers} worker(s) does not fit this "
            f"cluster ({ {k: v for k, v in available.items() if k in settings.trial_resources} })"
        )
    if fits < wanted:
        logger.warning("sweep.max_concurrent=%d lowered to %d: that many trials fit the cluster's %s",
                       wanted, fits, {k: available.get(k, 0) for k in settings.trial_resources})
    return fits


def _state_api_available(wait_s: float = 60.0) -> bool:
    """Whether the Ray state API answers (it needs the dashboard, which may still be starting)."""
    from ray.util.state import list_actors

    deadline = time.monotonic() + wait_s
    while True:
        try:
            list_actors(limit=1, timeout=10, raise_on_missing_output=False)
            return True
        except Exception:  # noqa: BLE001 - any failure means Ray Train's cleaner cannot use it either
            if time.monotonic() > deadline:
                return False
            time.sleep(1.0)


def _tuner(settings: SweepSettings, space: SearchSpace, base_config: dict, concurrency: int):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    single = not settings.multi_objective
    points = _new_points(settings, space.seed_points(base_config))
    searcher = _optuna_search_class()(
        metric=settings.metrics[0] if single else settings.metrics,
        mode=settings.modes[0] if single else settings.modes,
        points_to_evaluate=points or None,
        sampler=_sampler(settings, space),
        study_name=settings.name,
        storage=_study_storage(settings),
    )
    if settings.asha_enabled:
        scheduler = ASHAScheduler(time_attr="step", metric=settings.metrics[0], mode=settings.modes[0],
                                  max_t=settings.asha["max_t"], grace_period=settings.asha["grace_period"],
                                  reduction_factor=settings.asha["reduction_factor"],
                                  stop_last_trials=False)  # a trial at max_t ends its run itself
    else:
        scheduler = FIFOScheduler()
    return tune.Tuner(
        _trainable(settings),
        param_space=space.param_space(trial_base_config(base_config, settings, space)),
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=settings.num_samples,
                                    max_concurrent_trials=concurrency,
                                    # Reusing a trial actor saves its start and imports, but Tune cannot
                                    # reuse the actor of a trial it stopped early (the trial's thread still
                                    # runs): the next trial would error. So only without early stopping.
                                    reuse_actors=not settings.asha_enabled,
                                    trial_dirname_creator=_trial_dirname,
                                    trial_name_creator=_trial_dirname),
        run_config=tune.RunConfig(
            name=settings.name, storage_path=settings.output_dir, verbose=settings.verbose,
            # Ray Train trials retry failed workers themselves (ray.max_failures); an inline
            # trial is retried by Tune from its last Tune checkpoint instead.
            failure_config=tune.FailureConfig(
                max_failures=int(base_config["ray"].get("max_failures", 0)) if settings.executor == "inline" else 0),
            # Tune checkpoints (executor=inline only): the most recent ray.num_to_keep. Tune,
            # unlike Ray Train, may delete the latest checkpoint when it keeps the best-scoring
            # ones, and a resumed trial would then redo steps.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=base_config["ray"].get("num_to_keep"))),
    )


def _trainable(settings: SweepSettings):
    """The Tune trainable; the same on every (re)start, as ``Tuner.restore`` requires.

    ``executor=train``: the trial actor only drives its Ray Train run, so it holds no CPU or
    GPU of its own (a token 1 MiB of Ray's ``memory`` resource: Tune needs a non-empty
    request); the Train workers hold ``sweep.trial_resources`` (concurrency is capped to
    match). ``executor=inline``: the trial actor trains, so it holds them itself.
    """
    from ray import tune

    if settings.executor == "inline":
        return tune.with_resources(sweep_trial, dict(settings.trial_resources))
    return tune.with_resources(sweep_trial, {"CPU": 0, "memory": TRIAL_ACTOR_MEMORY})


def _load_spec(experiment_dir: Path) -> dict:
    path = experiment_dir / SWEEP_SPEC_FILE
    if not path.is_file():
        raise ConfigError(f"{experiment_dir} has no {SWEEP_SPEC_FILE}: not a sweep experiment folder")
    return json.loads(path.read_text())


def prepare_sweep(overrides: Sequence[str]) -> tuple[SweepSettings, SearchSpace, dict]:
    """Parses and validates everything on the driver: settings, base config, search space.

    Raises:
        ConfigError / SearchSpaceError: naming the key or the file and entry.
    """
    from ..run.compose import model_depth

    parsed, config_overrides = split_overrides(overrides)
    if not parsed.get("search"):
        raise ConfigError("medalign sweep needs search=NAME (a file in search_spaces/, e.g. search=medalign_default)")
    space = load_search_space(str(parsed["search"]))
    base_config = compose_config(config_overrides)
    base_config["run"]["name"] = base_config["run"].get("name") or "sweep"
    validate_run_config(base_config)
    space.validate(base_config, depth=model_depth(str(base_config["model"]["path"])))
    settings = sweep_settings(parsed, base_config, space, config_overrides)
    _refuse_trials_that_cannot_fit(base_config, settings)
    return settings, space, base_config


def _refuse_trials_that_cannot_fit(base_config: dict, settings: SweepSettings) -> None:
    """The preflight's trial-size check (run/preflight.py), before any Ray resource is requested."""
    from ..run.preflight import check_trial_fits, local_gpus, parse_gpus

    gpus = local_gpus() or parse_gpus(base_config["ray"].get("gpu_memory_gib"))
    problems = check_trial_fits(base_config, settings.trial_resources, gpus)
    if problems:
        raise ConfigError("medalign sweep: " + " ".join(problems))


def run_sweep(overrides: Sequence[str]) -> dict:
    """Runs (or with ``resume=true`` continues) a sweep and returns its summary.

    Args:
        overrides: ``search=NAME``, ``sweep.*`` settings, ``resume=true`` and run-config
            overrides (``experiment=synthmed_vqa trainer.max_steps=50 ...``).

    Returns:
        ``experiment_dir``, ``study`` (storage URL and name), ``metrics``/``modes``,
        ``best`` (trial id, params, run config, metrics), ``pareto`` (multi-objective),
        ``trials`` (count by status), ``early_stopping``, ``overhead`` (per-trial
        seconds outside the training loop), ``wall_s``, ``resumed``.

    Raises:
        ConfigError / SearchSpaceError: bad settings, config or search space (before Ray starts).
    """
    from ray import tune

    from ..run.evaluation import load_split, precompute_targets
    from ..run.driver import ensure_ray
    from ..run.storage import warn_storage

    started = time.time()
    settings, space, base_config = prepare_sweep(overrides)
    experiment_dir = settings.experiment_dir
    restorable = tune.Tuner.can_restore(str(experiment_dir))
    if restorable and not settings.resume:
        raise ConfigError(f"{experiment_dir} already holds sweep {settings.name!r}: pass resume=true to continue it, "
                          f"or a new sweep.name")
    if settings.resume and restorable:
        spec = _load_spec(experiment_dir)
        if spec["search_space"] != space.to_dict() or spec["config_overrides"] != settings.config_overrides:
            logger.warning("resume: continuing %s with its recorded search space and config; the search space "
                           "file or overrides given now differ and are ignored", experiment_dir)
        recorded = spec["settings"]
        for key in ("resume_errored", "restart_errored", "verbose"):
            recorded[key] = getattr(settings, key)
        settings = SweepSettings(**{**recorded, "resume": True})
        base_config = spec["base_config"]
    else:
        experiment_dir.mkdir(parents=True, exist_ok=True)
        _write_json(experiment_dir / SWEEP_SPEC_FILE, {
            "settings": settings.to_dict(), "base_config": base_config, "search_space": space.to_dict(),
            "search_file": space.source, "config_overrides": settings.config_overrides,
        })

    # Teacher targets once, on the driver: every trial only reads the shared cache.
    target_cache = {split: precompute_targets(base_config["teacher"], load_split(base_config["data"], split))
                    for split in ("train", "val", "test")}
    ensure_ray(base_config)
    warn_storage(settings.output_dir, base_config["ray"].get("address"), setting="sweep.output_dir")
    concurrency = (_cap_concurrency(settings, base_config["ray"].get("address")) if settings.executor == "train"
                   else settings.max_concurrent)  # inline trials hold their resources: Tune schedules them
    if settings.executor == "train" and settings.asha_enabled and not _state_api_available():
        raise ConfigError(
            "ASHA early stopping needs the Ray state API (the dashboard): Ray Train's PlacementGroupCleaner uses it "
            "to free the workers of a trial that Tune stops, and without it the next trials wait forever for CPUs. "
            "Start Ray with its dashboard (the default of `medalign sweep`), or pass sweep.asha.enabled=false"
        )
    if settings.multi_objective and settings.asha.get("enabled", True):
        logger.warning("multi-objective sweep (%s): ASHA early stopping is off, since it ranks trials on one "
                       "metric; every trial runs to trainer.max_steps", settings.metrics)

    # Tune saves its experiment state at most every 10 s by default; a trial started (or a
    # checkpoint committed) after the last save is unknown to `resume=true` after a driver
    # kill, and its work is redone by a fresh trial. Saving is cheap at sweep scale.
    os.environ.setdefault(TUNE_STATE_PERIOD_ENV, TUNE_STATE_PERIOD_S)
    if settings.resume and restorable:
        tuner = tune.Tuner.restore(str(experiment_dir), trainable=_trainable(settings), resume_unfinished=True,
                                   resume_errored=settings.resume_errored, restart_errored=settings.restart_errored)
    else:
        tuner = _tuner(settings, space, base_config, concurrency)
    tuner.fit()
    summary = summarize(experiment_dir, wall_s=time.time() - started, close_orphans=True)
    summary["resumed"] = bool(settings.resume and restorable)
    summary["target_cache"] = target_cache
    _write_json(experiment_dir / SUMMARY_FILE, summary)
    return {k: v for k, v in summary.items() if k != "records"}


# --------------------------------------------------------------------------- results


def trial_records(experiment_dir: Path) -> list[dict]:
    """One record per Tune trial: id, status, sampled values, last evaluation metrics, timings."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(experiment_dir))
    spec = _load_spec(Path(experiment_dir))
    keys = [k for k in spec["search_space"] if k != "points_to_evaluate"]
    records = []
    for trial in analysis.trials:
        folder = trial_folder(experiment_dir, trial.trial_id)
        config = trial_run_config(trial.config, folder)
        params = {}
        for key in keys:
            node: Any = config
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            params[key] = node
        final_path = folder / FINAL_FILE
        final = json.loads(final_path.read_text()) if final_path.is_file() else {}
        last = _scalars(trial.last_result)
        records.append({
            "trial_id": trial.trial_id,
            "status": trial.status,
            "params": params,
            "metrics": {k: v for k, v in last.items()
                        if k.startswith(("val/", "test/", "train/", "perf/")) or k == "step"},
            "path": str(folder),
            "config": {k: v for k, v in config.items() if k != META_KEY},
            "trial_wall_s": final.get("trial_wall_s"),
            "time_total_s": last.get("time_total_s"),  # Tune's trial time at its last result (running trials)
            # The copy in the trial folder: Trial.error_file is the Ray session's staging copy and
            # needs ray.init (medalign status reads a sweep from a plain process).
            "error": (str(folder / trial.run_metadata.error_filename)
                      if trial.run_metadata.error_filename else None),
        })
    return records


def _overhead(records: list[dict], config: dict) -> dict:
    """Per-trial seconds outside the training loop: trial wall time minus the loop's own time.

    The loop time follows from the last report's ``perf/samples_per_s`` (samples over loop
    seconds); the run's own wall time from ``perf/outside_loop_share`` (1 - loop / run wall).
    """
    rows = []
    for record in records:
        metrics = record["metrics"]
        # Tune's time at the last result when the trial never returned (stopped by ASHA).
        wall = record.get("trial_wall_s") or record.get("time_total_s")
        speed = metrics.get("perf/samples_per_s")
        share = metrics.get("perf/outside_loop_share")
        if not wall or not speed or share is None or not metrics.get("step"):
            continue
        trainer = record["config"]["trainer"]
        world = record["config"]["ray"]["num_workers"]
        samples = metrics["step"] * trainer["batch_size"] * trainer["grad_accum"] * world
        loop = samples / speed
        run_wall = loop / max(1.0 - share, 1e-9)
        rows.append({"trial_wall_s": wall, "loop_s": loop, "run_s": run_wall, "setup_s": metrics.get("perf/setup_s"),
                     "eval_s": metrics.get("perf/eval_s")})
    if not rows:
        return {}
    mean = lambda key: sum(r[key] or 0.0 for r in rows) / len(rows)
    return {
        "trials_measured": len(rows),
        "mean_trial_wall_s": mean("trial_wall_s"),
        "mean_training_loop_s": mean("loop_s"),
        "mean_run_training_s": mean("run_s"),
        "mean_setup_s": mean("setup_s"),
        "mean_ray_overhead_s": mean("trial_wall_s") - mean("run_s"),
        "mean_outside_loop_s": mean("trial_wall_s") - mean("loop_s"),
    }


def summarize(experiment_dir: Path, wall_s: float | None = None, close_orphans: bool = False) -> dict:
    """The sweep's summary from its folder: trial counts, the best trial, the study.

    Safe to call on a running sweep (``medalign status``). ``close_orphans`` (the driver,
    after ``fit`` returned) marks study trials still RUNNING as FAIL: a driver killed after
    asking Optuna for a trial but before Tune saved it leaves them behind.
    """
    import optuna

    experiment_dir = Path(experiment_dir)
    spec = _load_spec(experiment_dir)
    settings = SweepSettings(**spec["settings"])
    records = trial_records(experiment_dir)
    counts: dict[str, int] = {}
    for record in records:
        counts[record["status"]] = counts.get(record["status"], 0) + 1

    metric, mode = settings.metrics[0], settings.modes[0]
    scored = [r for r in records if isinstance(r["metrics"].get(metric), (int, float)) and r["status"] == "TERMINATED"]
    best = None
    if scored:
        top = (max if mode == "max" else min)(scored, key=lambda r: r["metrics"][metric])
        best = {"trial_id": top["trial_id"], "params": top["params"], "config": top["config"],
                "metrics": {m: top["metrics"].get(m) for m in settings.metrics},
                "all_metrics": {k: v for k, v in top["metrics"].items() if k.startswith(("val/", "test/"))},
                "path": top["path"]}

    # The study beside sweep.json, not at the recorded path: the folder may have been moved.
    storage = optuna.storages.RDBStorage(f"sqlite:///{experiment_dir.resolve() / STUDY_FILE}",
                                         engine_kwargs={"connect_args": {"timeout": 60}})
    study = optuna.load_study(study_name=settings.name, storage=storage)
    # Optuna trials asked by a driver that was killed before Tune saved them never finish: mark them.
    live = counts.get("RUNNING", 0) + counts.get("PENDING", 0)
    if close_orphans and live == 0:
        for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    states: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        states[trial.state.name] = states.get(trial.state.name, 0) + 1
    pareto = None
    if settings.multi_objective:
        pareto = [{"number": t.number, "values": t.values, "params": t.params} for t in study.best_trials]

    return {
        "experiment_dir": str(experiment_dir),
        "study": {"storage": settings.storage_url, "study_name": settings.name, "trials_by_state": states},
        "metrics": settings.metrics,
        "modes": settings.modes,
        "sampler": settings.sampler,
        "best": best,
        "pareto": pareto,
        "trials": counts,
        "num_trials": len(records),
        "early_stopping": (f"asha(time_attr=step, grace_period={settings.asha['grace_period']}, "
                           f"reduction_factor={settings.asha['reduction_factor']}, max_t={settings.asha['max_t']})"
                           if settings.asha_enabled else
                           ("off: ASHA cannot rank trials on several metrics" if settings.multi_objective else "off")),
        "overhead": _overhead(records, spec["base_config"]),
        "wall_s": wall_s,
        "records": records,
    }
