"""What a sweep folder says about its trials: one record per trial, and the sweep's summary.

Everything is read from the folder (``sweep.json``, Ray Tune's experiment state, the trials'
``final.json``, the Optuna study), without a running Ray, so it works on a running,
interrupted or finished sweep and after the folder was moved.
"""

from __future__ import annotations

import json
from pathlib import Path

import math
from collections.abc import Sequence
from typing import Any

from ..common.keys import get_flat, has_flat
from ..run.filesystems import StoragePath, is_uri, join, relocate
from .layout import (FINAL_FILE, META_KEY, load_spec, mirror_experiment, read_errored, study_storage, sweep_running,
                     trial_folder)
from .settings import SweepPlan
from .trial import scalars, trial_run_config


UNFINISHED = ("PENDING", "RUNNING", "PAUSED")


def live_records(records: Sequence[dict], running: bool = True, errored: Sequence[str] = ()) -> list[dict]:
    """Trial records with the status the sweep really has, the same in the summary and the leaderboard.

    Tune's saved experiment state turns RUNNING trials into PENDING when it is loaded (ready
    to be restarted). An unfinished trial that has reported a result is ``RUNNING`` while
    the sweep's driver runs and ``INTERRUPTED`` once it has stopped (``resume=true``
    continues it); one without a result is ``PENDING``.

    Args:
        running: whether the sweep driver is running (:func:`~.layout.sweep_running`).
        errored: trial ids the driver saw error for good (``errored.json``); their status is
            ``ERROR`` even where Tune's last snapshot still says otherwise.
    """
    out = []
    for record in records:
        if record["status"] in UNFINISHED and record["trial_id"] in errored:
            record = {**record, "status": "ERROR"}
        elif record["status"] in UNFINISHED or record["status"] == "INTERRUPTED":
            started = record["metrics"].get("step") is not None
            status = ("RUNNING" if running else "INTERRUPTED") if started else "PENDING"
            record = {**record, "status": status}
        out.append(record)
    return out


def finite_number(value: Any) -> int | float | None:
    """``value`` if it is a finite int or float, else None (strings, bools, NaN and missing values)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


def trial_records(experiment_dir: Path) -> list[dict]:
    """One record per Tune trial: id, status, sampled values, last evaluation metrics, timings."""
    import logging

    from ray.tune import ExperimentAnalysis

    # It also loads every trial's result.json, and warns for trials that have none yet
    # (started, no result): records need only its trial list.
    analysis_logger = logging.getLogger("ray.tune.analysis.experiment_analysis")
    level = analysis_logger.level
    analysis_logger.setLevel(logging.ERROR)
    try:
        analysis = ExperimentAnalysis(str(experiment_dir))
    finally:
        analysis_logger.setLevel(level)
    spec = load_spec(Path(experiment_dir))
    keys = [k for k in spec["search_space"] if k != "points_to_evaluate"]
    records = []
    for trial in analysis.trials:
        folder = trial_folder(experiment_dir, trial.trial_id)
        config = trial_run_config(trial.config, folder)
        params = {key: get_flat(config, key) if has_flat(config, key) else None for key in keys}
        final_path = folder / FINAL_FILE
        final = json.loads(final_path.read_text()) if final_path.is_file() else {}
        last = scalars(trial.last_result)
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
            "error": (str(folder / trial.run_metadata.error_filename) if trial.run_metadata.error_filename
                      else str(folder / "error.txt") if (folder / "error.txt").is_file() else None),
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


def summarize(experiment_dir: str | Path | StoragePath, wall_s: float | None = None, close_orphans: bool = False,
              study=None, running: bool | None = None) -> dict:
    """The sweep's summary from its folder: trial counts, the best trial, the study.

    Safe to call on a running sweep (``medalign status``). ``close_orphans`` (the driver,
    after ``fit`` returned) marks study trials still RUNNING as FAIL: a driver killed after
    asking Optuna for a trial but before Tune saved it leaves them behind. Trial statuses
    are :func:`live_records`' (``running``: whether the driver runs; default: read from
    ``driver.json``).

    Args:
        experiment_dir: the sweep folder, local or remote (``s3://...``: its records are read
            from a local mirror, and the paths in the summary name the remote folder).
        study: the :class:`~medalign_platform.tune.study_storage.StudyStorage` to read (the
            driver's own); default: the recorded one, a file study beside ``sweep.json``.
    """
    if is_uri(experiment_dir):
        location = StoragePath(experiment_dir)
        local = mirror_experiment(location)
        summary = relocate(summarize(local, wall_s, close_orphans, study, running), local, location)
        if study is None and summary["study"]["file"]:
            summary["study"]["storage"] = join(location, summary["study"]["file"])
        return summary
    import optuna

    experiment_dir = Path(str(experiment_dir))  # a local StoragePath, str or Path
    spec = load_spec(experiment_dir)
    settings = SweepPlan(**spec["settings"])
    study = study or study_storage(experiment_dir, spec)
    if running is None:
        running = sweep_running(experiment_dir)
    records = live_records(trial_records(experiment_dir), running, list(read_errored(experiment_dir)))
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

    # A file study beside sweep.json, not at the recorded path: the folder may have been moved.
    storage = study
    study = optuna.load_study(study_name=settings.name, storage=storage.open())
    # Optuna trials asked by a driver that was killed before Tune saved them never finish: mark them.
    live = counts.get("RUNNING", 0) + counts.get("PENDING", 0) + counts.get("INTERRUPTED", 0)
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
        "study": {"storage": storage.url, "study_name": settings.name, "trials_by_state": states,
                  "file": Path(storage.target).name if storage.is_file_in_experiment else None},
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
