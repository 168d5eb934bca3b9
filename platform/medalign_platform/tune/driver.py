"""``medalign sweep``: Ray Tune + Optuna over a search space, driven from one process.

``run_sweep(["experiment=synthmed_vqa", "search=medalign_default", "sweep.num_samples=8"])``
(or a :class:`~medalign_platform.tune.settings.SweepRequest`):

* :func:`prepare_sweep` checks everything on the driver, once, before Ray starts: the run
  config (composed and typed like ``medalign train``), the search space against that config
  and the model, and the sweep options resolved into a plan.
* Search: Optuna (``OptunaSearch``) with TPE (default), random, CMA-ES, NSGA-II or a grid
  sampler, seeded by ``sweep.seed``; seed points from the space's ``points_to_evaluate``
  run first. The study (study name = sweep name) lives where ``sweep.storage`` says: by
  default ``EXP_DIR/optuna.db`` (SQLite), else a journal file or a database such as
  PostgreSQL (:mod:`.study_storage`).
* Storage: ``sweep.output_dir`` is a local folder or a URI (``s3://bucket/prefix``); the
  driver and the trials write the experiment folder through
  :mod:`medalign_platform.run.filesystems`, Tune persists its state and checkpoints there.
* Early stopping: ASHA on the training step (``time_attr="step"``); multi-objective sweeps
  (``sweep.metrics=[a,b]``) run without it.
* Resources: ``sweep.trial_resources`` per trial worker. With Ray Train trials the workers
  hold them and the trial actor holds none, so ``max_concurrent`` is capped to what a local
  cluster fits; inline trials hold them through ``tune.with_resources``. ASHA with Ray Train
  trials needs the Ray dashboard (state API) to free a stopped trial's workers.
* Resume: ``resume=true`` restores the Tune experiment (``Tuner.restore``): finished trials
  stay finished, unfinished ones continue from their checkpoints (:mod:`.trial`), the
  searcher continues from its saved state and the study. ``sweep.restart_errored=true``
  first sets aside what errored trials left in their folders, so they start from scratch.
* Faults and the console: the selected metrics are checked against what the evaluation of
  the data reports and the trial resources against the cluster's nodes before anything
  trains; Ctrl-C / SIGTERM stop the sweep gracefully (:mod:`.outcome` gives the exit status
  and the resume command); ``driver.json`` says whether a driver runs the folder, so the
  summary and ``medalign status`` give the same statuses; Tune's own loggers are replaced
  by :class:`~.result_log.TrialResultLog` and its tables by :class:`~.progress.SweepProgress`.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path

from ..common.errors import ConfigError
from ..common.keys import tune_key
from ..run.filesystems import StoragePath
from .errored import mark_errored_in_state, set_aside_errored_trials
from .layout import (DRIVER_LOG, SUMMARY_FILE, SWEEP_SPEC_FILE, TRIAL_LOG, check_private, load_spec, read_driver_state,
                     trial_dirname, write_driver_state)
from .outcome import interruptible
from .search_space import SearchSpace, load_search_space
from .settings import SweepPlan, SweepRequest, parse_sweep_request, resolve_plan
from .study_storage import StudyUploader, connect, resolve_storage, study_file_name
from .trial import sweep_trial, trial_base_config

logger = logging.getLogger(__name__)

TRIAL_ACTOR_MEMORY = 2**20            # bytes of Ray's memory resource held by each Ray Train trial actor
TUNE_STATE_PERIOD_ENV = "TUNE_GLOBAL_CHECKPOINT_S"  # how often Tune saves its experiment state
TUNE_STATE_PERIOD_S = "1"
DISABLE_TUNE_LOGGERS_ENV = "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"


def prepare_sweep(request: SweepRequest | Sequence[str], base=None):
    """Checks everything on the driver, once: run config, search space, sweep options.

    Args:
        request: the sweep request (or the overrides to parse into one).
        base: the base run's checked settings when the caller composed them already
            (``medalign ablate-layers``); else composed from ``request.config_overrides``.

    Returns:
        ``(plan, space, base)``: the :class:`SweepPlan`, the search space and the base
        run's :class:`~medalign_platform.run.settings.RunSettings`.

    Raises:
        ConfigError / SearchSpaceError: naming the key or the file and entry.
    """
    from ..run.driver import resolve_run_settings

    if not isinstance(request, SweepRequest):
        request = parse_sweep_request(request)
    if request.search is None:
        raise ConfigError("medalign sweep needs search=NAME (a file in search_spaces/, e.g. search=medalign_default)")
    space = request.search if isinstance(request.search, SearchSpace) else load_search_space(str(request.search))
    base = base or resolve_run_settings(request.config_overrides, default_name="sweep")
    space.validate(base)
    plan = resolve_plan(request, base, space)
    _refuse_trials_that_cannot_fit(base, plan)
    _refuse_asha_without_state_api(base, plan)
    return plan, space, base


ASHA_NEEDS_STATE_API = ("ASHA early stopping of sweep.executor=train trials needs the Ray state API (the dashboard): "
                        "Ray Train's PlacementGroupCleaner uses it to free the workers of a trial that Tune stops, and "
                        "without it the next trials wait forever for CPUs.")


def _refuse_asha_without_state_api(base, plan: SweepPlan) -> None:
    """A local cluster started with ``ray.include_dashboard=false`` has no state API: refused here,
    before Ray starts (a joined cluster is checked once connected, in :func:`_launch`)."""
    from ..run.cluster import ray_init_address
    from ..run.network import starts_local_cluster

    if (plan.executor == "train" and plan.asha_enabled and not base.ray.include_dashboard
            and starts_local_cluster(ray_init_address(base.ray.address)[0])):
        raise ConfigError(f"ray.include_dashboard=false: {ASHA_NEEDS_STATE_API} Drop ray.include_dashboard=false "
                          f"or pass sweep.asha.enabled=false")


def _refuse_trials_that_cannot_fit(base, plan: SweepPlan) -> None:
    """The preflight's trial-size check (``run/preflight.py``), before any Ray resource is requested:
    a trial's estimated GPU memory against its share of the cluster's (or ``ray.gpu_memory_gib``'s) GPUs."""
    from ..run.preflight import check_trial_fits, local_gpus, parse_gpus

    gpus = local_gpus() or parse_gpus(base.ray.gpu_memory_gib)
    problems = check_trial_fits(base, plan.trial_resources, gpus)
    if problems:
        raise ConfigError(" ".join(problems))


def run_sweep(request: SweepRequest | Sequence[str], prepared: tuple | None = None) -> dict:
    """Runs (or with ``resume=true`` continues) a sweep and returns its summary.

    Args:
        request: the sweep request, or the overrides to parse into one (``search=NAME``,
            ``sweep.*``, ``resume=true`` and run-config overrides).
        prepared: :func:`prepare_sweep`'s result when the caller already checked the request.

    Returns:
        ``experiment_dir``, ``study`` (storage URL and name), ``metrics``/``modes``,
        ``best`` (trial id, params, run config, metrics), ``pareto`` (multi-objective),
        ``trials`` (count by status), ``early_stopping``, ``overhead`` (per-trial
        seconds outside the training loop), ``wall_s``, ``resumed``.

    Raises:
        ConfigError / SearchSpaceError: bad settings, config or search space (before Ray starts).
    """
    from ray import tune

    from ..run.driver import check_selection_metrics

    started = time.time()
    plan, space, base = prepared or prepare_sweep(request)
    base_config = base.to_dict()
    location = StoragePath(plan.experiment_location)
    restorable = tune.Tuner.can_restore(str(location))
    # A folder with sweep.json but no Tune state and no trial is a start that failed its checks.
    if (restorable or any(p.name.startswith("trial_") for p in location.iterdir())) and not plan.resume:
        raise ConfigError(f"{location} already holds sweep {plan.name!r}: pass resume=true to continue it, "
                          f"or a new sweep.name")
    if plan.resume and restorable:
        check_private(str(location))  # resume unpickles Tune's state files from this folder
        if not location.is_remote:
            from .state_backup import repair_tune_state

            repair_tune_state(location.local())  # a kill during Tune's copy of its state
        spec = load_spec(location)
        if spec["search_space"] != space.to_dict() or spec["config_overrides"] != plan.config_overrides:
            logger.warning("resume: continuing %s with its recorded search space and config; the search space "
                           "file or overrides given now differ and are ignored", location)
        recorded = spec["settings"]
        for key in ("resume_errored", "restart_errored", "verbose"):
            recorded[key] = getattr(plan, key)
        plan = SweepPlan(**{**recorded, "resume": True})
        base_config = spec["base_config"]
    else:
        check_selection_metrics(base, _selection_metrics(plan))
    study = open_study(plan, location)  # before Ray starts: a database that is down fails here
    if not (plan.resume and restorable):
        location.mkdir(private=True)
        (location / SWEEP_SPEC_FILE).write_json({
            "settings": plan.to_dict(), "base_config": base_config, "search_space": space.to_dict(),
            "search_file": space.source, "config_overrides": plan.config_overrides,
        })

    from .progress import driver_console

    # The driver's log is a local file: beside sweep.json, or for a remote experiment in the driver's own folder.
    driver_log = (location.local() if not location.is_remote else plan.study_dir) / DRIVER_LOG
    write_driver_state(location, "running")
    with driver_console(driver_log, plan.verbose) as console, interruptible() as interruption:
        try:
            summary = _launch(plan, space, base, base_config, restorable, interruption, console, study, location)
        except KeyboardInterrupt:  # a second Ctrl-C / SIGTERM, or one before Tune's loop ran
            if interruption.signum is None:
                interruption.signum = signal.SIGINT
            summary = None
        except BaseException:
            write_driver_state(location, "failed")
            raise
        state = "interrupted" if interruption.signum else "finished"
        write_driver_state(location, state)
        if summary is None or interruption.signum:
            summary = {**(summary or {}), **_summary(location, started, study)}
    summary["wall_s"] = time.time() - started
    summary["interrupted"] = interruption.name
    summary["num_samples"] = plan.num_samples
    summary["logs"] = _log_locations(location, console.log_file if console.quiet else None, plan)
    summary["errored"] = [{"trial_id": r["trial_id"], "error": r["error"]} for r in summary.get("records", [])
                          if r["status"] == "ERROR"]
    (location / SUMMARY_FILE).write_json(summary)
    write_driver_state(location, read_driver_state(location).get("state", "finished"), trials=summary.get("trials"))
    return {k: v for k, v in summary.items() if k != "records"}


def _selection_metrics(plan: SweepPlan) -> dict[str, str]:
    """``{setting: metric}`` of what the sweep selects on, for the messages."""
    if len(plan.metrics) == 1:
        return {"sweep.metric": plan.metrics[0]}
    return {f"sweep.metrics[{i}]": metric for i, metric in enumerate(plan.metrics)}


def _summary(experiment_dir, started: float, study=None) -> dict:
    """The summary of a sweep from its folder, or a minimal one when Tune never saved its state."""
    from .records import summarize

    try:
        return summarize(experiment_dir, wall_s=time.time() - started, close_orphans=False, study=study,
                         running=False)
    except Exception as error:  # noqa: BLE001 - stopped before Tune wrote anything: report that instead
        logger.info("no summary of %s: %s", experiment_dir, error)
        return {"experiment_dir": str(experiment_dir), "trials": {}, "num_trials": 0, "records": [],
                "early_stopping": "n/a", "best": None}


def _log_locations(experiment_dir, driver_log, plan: SweepPlan) -> str | None:
    if plan.verbose >= 2:
        return None
    where = f"trial output in {experiment_dir}/trial_<id>/{TRIAL_LOG}"
    return f"{where}; driver log {driver_log}" if driver_log else where


def _launch(plan: SweepPlan, space: SearchSpace, base, base_config: dict, restorable: bool, interruption,
            console, study, location: StoragePath) -> dict:
    """Everything after the checks: targets, Ray, resources, the Tuner, ``fit`` and the summary."""
    from ray import tune

    from ..run.cluster import check_fits
    from ..run.driver import driver_prologue
    from .records import summarize

    started = time.time()
    target_cache = driver_prologue(base, output_dir=plan.output_dir, setting="sweep.output_dir",
                                   quiet=plan.verbose < 2)
    interruption.install()  # ray.init replaced the SIGTERM handler with its crash handler
    console.install()  # and removed the handlers of the `ray` logger
    check_fits(plan.trial_resources, plan.num_workers, "sweep.trial_resources")
    concurrency = (_cap_concurrency(plan, base.ray.address) if plan.executor == "train"
                   else plan.max_concurrent)  # inline trials hold their resources: Tune schedules them
    if plan.executor == "train" and plan.asha_enabled and not _state_api_available():
        raise ConfigError(f"{ASHA_NEEDS_STATE_API} Start the cluster with its dashboard (`ray start` and "
                          f"ray.include_dashboard do by default), or pass sweep.asha.enabled=false")
    if plan.multi_objective and plan.asha.get("enabled", True):
        logger.warning("multi-objective sweep (%s): ASHA early stopping is off, since it ranks trials on one "
                       "metric; every trial runs to trainer.max_steps", plan.metrics)

    # Tune saves its experiment state at most every 10 s by default; a trial started (or a
    # checkpoint committed) after the last save is unknown to `resume=true` after a driver
    # kill, and its work is redone by a fresh trial. Saving is cheap at sweep scale.
    os.environ.setdefault(TUNE_STATE_PERIOD_ENV, TUNE_STATE_PERIOD_S)
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")  # frequent on purpose
    os.environ[DISABLE_TUNE_LOGGERS_ENV] = "1"  # TrialResultLog replaces them (append-only, no second TensorBoard)
    if any(metric.startswith("test/") for metric in plan.metrics):  # allowed: reported at each trial's end only
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    callbacks = _callbacks(plan, space, concurrency, study, location)
    uploader = _study_uploader(study, location)
    if plan.resume and restorable:
        mark_errored_in_state(location)
        if plan.restart_errored:
            set_aside_errored_trials(location)
        tuner = tune.Tuner.restore(str(location), trainable=_trainable(plan), resume_unfinished=True,
                                   resume_errored=plan.resume_errored, restart_errored=plan.restart_errored)
        # The restored run config is the pickled original: this run's console settings replace its callbacks.
        run_config = tuner._local_tuner.get_run_config()
        run_config.callbacks, run_config.verbose = callbacks, tune_verbosity(plan.verbose)
    else:
        tuner = _tuner(plan, space, base_config, concurrency, callbacks)
    interruption.tune_running = True
    try:
        with console.stdout_to_log():
            tuner.fit()
    finally:
        interruption.tune_running = False
        if uploader is not None:
            uploader.stop()
    summary = summarize(location, wall_s=time.time() - started, close_orphans=not interruption.signum, study=study,
                        running=False)
    if uploader is not None:
        uploader.upload()  # close_orphans may have changed it
        summary["study"]["storage"] = str(uploader.remote)
    summary["resumed"] = bool(plan.resume and restorable)
    summary["target_cache"] = target_cache
    return summary


def tune_verbosity(verbose: int) -> int:
    """Tune's own console verbosity for ``sweep.verbose``: silent below 2 (the platform's progress view)."""
    return {0: 0, 1: 0, 2: 1, 3: 2}[verbose]


def _callbacks(plan: SweepPlan, space: SearchSpace, concurrency: int, study, location: StoragePath) -> list:
    from .progress import SweepProgress
    from .result_log import StudyLink, TrialErrors, TrialResultLog
    from .state_backup import TuneStateBackup

    callbacks = [TrialResultLog(), StudyLink(study, plan.name, plan.metrics), TrialErrors(str(location))]
    if not location.is_remote:
        callbacks.append(TuneStateBackup(str(location.local())))
    if plan.verbose == 1:
        callbacks.append(SweepProgress(
            name=plan.name, experiment_dir=str(location),
            params=[key for key, param in space.params.items() if param.sampled], metric=plan.metrics[0],
            mode=plan.modes[0], num_samples=plan.num_samples, max_concurrent=concurrency, max_steps=plan.asha["max_t"],
            early_stopping="asha" if plan.asha_enabled else "off"))
    return callbacks


def open_study(plan: SweepPlan, location: StoragePath):
    """The sweep's study storage (``sweep.storage``), checked by opening it once.

    A file study of a remote experiment lives in the driver's :attr:`SweepPlan.study_dir`;
    it starts from the experiment folder's copy when that one is newer (a resume elsewhere).

    Raises:
        ConfigError: the storage cannot be opened (naming ``sweep.storage`` and the fix).
    """
    storage = resolve_storage(plan.storage, plan.study_dir)
    name = study_file_name(storage)
    if location.is_remote and name is not None:
        local, remote = Path(storage.target), location / name
        local.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(local.parent, 0o700)
        remote_mtime = _remote_mtime(remote)
        if remote_mtime is not None and (not local.is_file() or local.stat().st_mtime < remote_mtime):
            local.write_bytes(remote.read_bytes())
    connect(storage)
    return storage


def _remote_mtime(place: StoragePath) -> float | None:
    info = place.fs.get_file_info(place.path)
    if not info.is_file:
        return None
    return info.mtime.timestamp() if info.mtime is not None else 0.0


def _study_uploader(storage, location: StoragePath):
    """The started :class:`StudyUploader` that copies a remote experiment's file study into it
    while the sweep runs (None for a local experiment or a database study)."""
    name = study_file_name(storage)
    if not location.is_remote or name is None:
        return None
    return StudyUploader(Path(storage.target), location / name).start()


# --------------------------------------------------------------------------- Tune and Optuna


def optuna_search_class():
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
            if not isinstance(self.metric, list) and self.metric not in result:
                return  # a test/* metric (sweep.allow_test_selection): only the trial's last result has it
            try:
                super().on_trial_result(trial_id, result)
            except RuntimeError as error:  # optuna: the trial is already finished in the study
                logger.info("study trial of %s is closed; result not recorded again (%s)", trial_id, error)

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
            if trial_id in self._ot_trials:
                super().on_trial_complete(trial_id, result=result, error=error)

    return SweepOptunaSearch


def sampler(plan: SweepPlan, space: SearchSpace):
    """The Optuna sampler of ``sweep.sampler``, seeded by ``sweep.seed``."""
    import optuna

    seed = plan.seed
    if plan.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=plan.n_startup_trials)
    if plan.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if plan.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=plan.n_startup_trials)
    if plan.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    grid = {tune_key(key): space.grid_values(param) for key, param in space.params.items() if param.sampled}
    return optuna.samplers.GridSampler(grid, seed=seed)


def study_storage(plan: SweepPlan):
    """The study's Optuna storage (``sweep.storage``: SQLite with a generous lock timeout for
    concurrent readers by default; a journal file; or a database such as PostgreSQL)."""
    return resolve_storage(plan.storage, plan.study_dir).open()


def _new_points(plan: SweepPlan, points: list[dict]) -> list[dict]:
    """Seed points not yet in an existing study (a sweep restarted before Tune saved any state)."""
    import optuna

    try:
        study = optuna.load_study(study_name=plan.name, storage=study_storage(plan))
    except KeyError:
        return points
    seen = [t.params or t.system_attrs.get("fixed_params", {}) for t in study.get_trials(deepcopy=False)]
    return [p for p in points if not any(all(s.get(k) == v for k, v in p.items()) for s in seen)]


def trials_that_fit(plan: SweepPlan, available: dict) -> int:
    """How many of the plan's trials run at once on ``available`` resources (at most max_concurrent).

    Fractional amounts count as such: ``trial_resources={GPU: 0.5}`` fits two trials per GPU.
    """
    fits = plan.max_concurrent
    for key, amount in plan.trial_resources.items():
        need = amount * plan.num_workers
        if need > 0:
            fits = min(fits, int(available.get(key, 0) / need + 1e-9))
    return fits


def _cap_concurrency(plan: SweepPlan, address: str | None) -> int:
    """``max_concurrent`` lowered to what a local cluster can run at once (Tune does not see
    the Train workers' resources: the trial actor itself holds none)."""
    import ray

    wanted = plan.max_concurrent
    if address:
        return wanted
    available = ray.cluster_resources()
    fits = trials_that_fit(plan, available)
    if fits < 1:
        raise ConfigError(
            f"sweep.trial_resources={plan.trial_resources} x {plan.num_workers} worker(s) does not fit this "
            f"cluster ({ {k: v for k, v in available.items() if k in plan.trial_resources} })"
        )
    if fits < wanted:
        logger.warning("sweep.max_concurrent=%d lowered to %d: that many trials fit the cluster's %s",
                       wanted, fits, {k: available.get(k, 0) for k in plan.trial_resources})
    return fits


def _state_api_available(wait_s: float = 180.0) -> bool:
    """Whether the Ray state API answers (it needs the dashboard, which may still be starting: on a
    loaded 2-core machine that took over a minute)."""
    import ray
    from ray.util.state import list_actors

    # The connected cluster's own GCS address: left to auto-detection, the state API refuses
    # when several Ray clusters run on the machine (other users', other sweeps').
    address = ray.get_runtime_context().gcs_address if ray.is_initialized() else None
    deadline = time.monotonic() + wait_s
    while True:
        try:
            list_actors(address=address, limit=1, timeout=10, raise_on_missing_output=False)
            return True
        except Exception:  # noqa: BLE001 - any failure means Ray Train's cleaner cannot use it either
            if time.monotonic() > deadline:
                return False
            time.sleep(1.0)


def _tuner(plan: SweepPlan, space: SearchSpace, base_config: dict, concurrency: int, callbacks: list):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    single = not plan.multi_objective
    points = _new_points(plan, space.seed_points(base_config))
    searcher = optuna_search_class()(
        metric=plan.metrics[0] if single else plan.metrics,
        mode=plan.modes[0] if single else plan.modes,
        points_to_evaluate=points or None,
        sampler=sampler(plan, space),
        study_name=plan.name,
        storage=study_storage(plan),
    )
    if plan.asha_enabled:
        scheduler = ASHAScheduler(time_attr="step", metric=plan.metrics[0], mode=plan.modes[0],
                                  max_t=plan.asha["max_t"], grace_period=plan.asha["grace_period"],
                                  reduction_factor=plan.asha["reduction_factor"],
                                  stop_last_trials=False)  # a trial at max_t ends its run itself
    else:
        scheduler = FIFOScheduler()
    return tune.Tuner(
        _trainable(plan),
        param_space=space.param_space(trial_base_config(base_config, plan, space)),
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=plan.num_samples,
                                    max_concurrent_trials=concurrency,
                                    # Off unless asked for (sweep.reuse_actors): a dead cached actor
                                    # errors the next trial regardless of max_failures.
                                    reuse_actors=plan.reuse_actors,
                                    trial_dirname_creator=trial_dirname,
                                    trial_name_creator=trial_dirname),
        run_config=tune.RunConfig(
            name=plan.name, storage_path=plan.output_dir, verbose=tune_verbosity(plan.verbose), callbacks=callbacks,
            # Ray Train trials retry failed workers themselves (ray.max_failures); an inline
            # trial is retried by Tune from its last Tune checkpoint instead.
            failure_config=tune.FailureConfig(
                max_failures=int(base_config["ray"]["max_failures"]) if plan.executor == "inline" else 0),
            # Tune checkpoints (executor=inline only): the most recent ray.num_to_keep. Tune,
            # unlike Ray Train, may delete the latest checkpoint when it keeps the best-scoring
            # ones, and a resumed trial would then redo steps.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=base_config["ray"]["num_to_keep"])),
    )


def _trainable(plan: SweepPlan):
    """The Tune trainable; the same on every (re)start, as ``Tuner.restore`` requires.

    ``executor=train``: the trial actor only drives its Ray Train run, so it holds no CPU or
    GPU of its own (a token 1 MiB of Ray's ``memory`` resource: Tune needs a non-empty
    request); the Train workers hold ``sweep.trial_resources`` (concurrency is capped to
    match). ``executor=inline``: the trial actor trains, so it holds them itself.
    """
    from ray import tune

    if plan.executor == "inline":
        return tune.with_resources(sweep_trial, dict(plan.trial_resources))
    return tune.with_resources(sweep_trial, {"CPU": 0, "memory": TRIAL_ACTOR_MEMORY})
