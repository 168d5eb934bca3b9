"""One Tune trial: the base run config with its sampled values, trained by one of two executors.

Each trial is the function :func:`sweep_trial`. It sets the derived keys (search-space
rules), points the run at the trial's folder, and trains with

* ``executor=inline``: the training loop runs in the trial process itself
  (:func:`medalign_platform.run.runner.run_in_process`), checkpoints are Tune checkpoints of
  the trial and Tune retries a crashed trial from the last one; no Train controller,
  worker actor and process group per trial (~1-3 s of overhead instead of ~10-25 s on a
  2-core machine, ``benchmarks/sweep_overhead.py``);
* ``executor=train``: the trial builds the run's ``TorchTrainer`` (the same as ``medalign
  train``, DDP included) and reports every evaluation to Tune through ``TuneReportCallback``.

Either way only evaluation reports reach Tune (it needs the searched metric in every result;
training scalars go to the trial's TensorBoard), ``final.json`` records the final metrics
before the last report (ASHA may stop a trial at its last rung), and a restarted trial
(a resumed sweep) continues from its newest complete checkpoint (verified against its
manifest's checksums) or replays its recorded final metrics when its training had already
finished. A restarted inline trial never writes into an existing checkpoint folder: Tune
numbers checkpoints from the index its last saved state knew, which can be behind the
folders on disk, so the trial moves its index past them first. With a quiet console
(``sweep.verbose`` < 2) everything the trial's processes print goes to ``trial.log``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from pathlib import Path

from ..common.keys import flatten
from ..run.checkpoint import TRAINER_STATE, complete_checkpoints, seal_checkpoint
from ..run.filesystems import StoragePath, join
from .layout import FINAL_FILE, MANIFEST_FILE, META_KEY, TRAIN_RUN_NAME, TRIAL_LOG, trial_location
from .search_space import Rule, apply_rules

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- trial configs


def trial_base_config(base_config: dict, plan, space) -> dict:
    """The config every trial starts from: the run config, the trial's scaling, and the rules.

    Args:
        base_config: the complete base run config (plain dict).
        plan: the :class:`~medalign_platform.tune.settings.SweepPlan`.
        space: the :class:`~medalign_platform.tune.search_space.SearchSpace`.
    """
    config = copy.deepcopy(base_config)
    resources = dict(plan.trial_resources)
    config["ray"].update({
        "num_workers": plan.num_workers,
        "use_gpu": resources.get("GPU", 0) > 0,
        "resources_per_worker": resources,
        "address": None,  # trials run inside the sweep's cluster
    })
    config[META_KEY] = {
        "experiment_dir": plan.experiment_location,  # a local path or a URI
        "executor": plan.executor,
        "rules": [rule.to_dict() for rule in space.rules.values()],
        "console_log": plan.verbose < 2,  # quiet console: the trial's output goes to trial.log
    }
    return config


def trial_run_config(trial_config: dict, trial_dir: Path | StoragePath | str) -> dict:
    """The run config of one trial: rules applied, the sweep metadata removed, run paths set
    (the trial folder: a local path or a URI)."""
    meta = trial_config.get(META_KEY, {})
    config = apply_rules({k: v for k, v in trial_config.items() if k != META_KEY},
                         [Rule.from_dict(item) for item in meta.get("rules", [])])
    config["run"] = {**config.get("run", {}), "output_dir": str(trial_dir), "name": TRAIN_RUN_NAME,
                     "log_dir": join(str(trial_dir), "tensorboard")}
    if meta.get("console_log") and not StoragePath(str(trial_dir)).is_remote:
        config["run"]["console_log"] = str(Path(str(trial_dir)) / TRIAL_LOG)
    return config


# --------------------------------------------------------------------------- the trial


def scalars(metrics: dict | None) -> dict:
    """The finite scalar entries of a result (what records and ``final.json`` keep)."""
    return {k: v for k, v in (metrics or {}).items()
            if isinstance(v, (int, float, str, bool)) and not (isinstance(v, float) and not math.isfinite(v))}


def is_evaluation(metrics: dict) -> bool:
    return any(str(k).startswith(("val/", "test/")) for k in metrics)


def sweep_trial(config: dict) -> None:
    """One Tune trial: the run of the base config with this trial's sampled values."""
    import ray.tune

    from ..run.settings import RunSettings

    started = time.perf_counter()
    trial_dir = trial_location(config[META_KEY]["experiment_dir"], ray.tune.get_context().get_trial_id())
    trial_dir.mkdir()
    run_config = trial_run_config(config, trial_dir)
    settings = RunSettings.from_config(run_config)  # types the sampled values (the base was checked by the driver)
    final_path = trial_dir / FINAL_FILE
    if final_path.is_file():  # finished before the sweep driver stopped: report what it recorded
        ray.tune.report(final_path.read_json()["metrics"])
        return
    max_steps = settings.trainer.max_steps
    metrics = _recorded_final_metrics(trial_dir / TRAIN_RUN_NAME, max_steps)
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
            final_path.write_json(_final_record(final_metrics, started, prepared,
                                                time.perf_counter() - tick, False, run_config))

        metrics, replayed = _fit_inline(settings, on_final=record_final)
        fit_seconds = time.perf_counter() - tick
    else:
        from ..run.ray_train import build_trainer

        trainer = build_trainer(settings, callbacks=[_eval_report_callback()])
        tick = prepared = time.perf_counter()
        result = trainer.fit()
        fit_seconds = time.perf_counter() - tick
        if result.error is not None:
            raise result.error
        metrics = scalars(result.metrics)
    final_path.write_json(_final_record(metrics, started, prepared, fit_seconds, replayed, run_config))


def _final_record(metrics: dict, started: float, prepared: float, fit_seconds: float, replayed: bool,
                  run_config: dict) -> dict:
    """``final.json`` of a trial: its final metrics and timings (perf_counter seconds), and the
    Ray node that ran it (``node_id``: which machine of a multi-node cluster)."""
    import ray

    return {
        "node_id": ray.get_runtime_context().get_node_id(),
        "metrics": metrics,
        "trial_wall_s": time.perf_counter() - started,
        "before_fit_s": prepared - started,
        "fit_s": fit_seconds,
        "replayed": replayed,
        "params": {k: v for k, v in flatten(run_config).items() if k.split(".")[0] in ("distill", "lora", "optim")},
    }


def _eval_report_callback():
    """A ``TuneReportCallback`` that forwards only evaluation reports (those with val/ or test/ keys)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class EvalReportCallback(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics and is_evaluation(metrics[0]):
                super().after_report(run_context, metrics, checkpoint)

    return EvalReportCallback()


def _fit_inline(settings, on_final=None) -> tuple[dict, bool]:
    """Runs the training loop in this trial process (``sweep.executor=inline``).

    Checkpoints are Tune checkpoints of the trial (each also holds its ``metrics.json`` and
    a ``manifest.json``), so a resumed sweep continues the trial from its last evaluation.

    Args:
        settings: the trial's run settings.
        on_final: called with the final metrics just before they are reported to Tune.

    Returns:
        the final metrics and whether they were replayed from a finished checkpoint.
    """
    import ray
    import ray.tune
    import torch

    from ..run.runner import run_in_process

    max_steps = settings.trainer.max_steps
    checkpoint = ray.tune.get_checkpoint()
    trial_place = StoragePath(settings.run.output_dir)
    skip_existing_checkpoint_names(trial_place)
    tune_checkpoint = (StoragePath(_checkpoint_uri(checkpoint, settings.run.output_dir))
                       if checkpoint is not None else None)
    if tune_checkpoint is not None and not tune_checkpoint.is_remote and tune_checkpoint.is_dir() \
            and not _complete(tune_checkpoint.local()):
        checkpoint = tune_checkpoint = None  # half-written: the newest complete one (or none) is used instead
    # Tune restores a trial from the checkpoint its last saved experiment state names, which
    # can be seconds behind (a killed driver); the trial folder may hold a newer complete one.
    newest = newest_trial_checkpoint(trial_place)
    tune_step = _checkpoint_step(tune_checkpoint)
    local = None
    if newest is not None and newest[0] > tune_step:
        logger.info("resuming from %s (step %d), newer than Tune's restored checkpoint", newest[1], newest[0])
        local = newest[1]
    recorded = local if local is not None else tune_checkpoint
    if (recorded is not None and (recorded / "metrics.json").is_file()
            and _checkpoint_step(recorded) >= max_steps):
        metrics = (recorded / "metrics.json").read_json()  # finished; only the record was lost
        ray.tune.report(metrics)
        return metrics, True

    if recorded is not None and (recorded / "metrics.json").is_file():
        # The evaluation this checkpoint was taken at may never have reached the driver (it was
        # stopped or killed first): report it again; the result log keeps one row per step.
        ray.tune.report(json.loads((recorded / "metrics.json").read_text()))

    def resume(scratch: Path) -> Path | None:
        if local is not None:
            if not local.is_remote:
                return local.local()
            local.download(scratch / "resume")  # a newer checkpoint on remote storage
            return scratch / "resume"
        if checkpoint is not None:  # only now copied: the newer local one above needs no copy
            return Path(checkpoint.to_directory(str(scratch / "resume")))
        return None

    def report(metrics: dict, checkpoint_dir: Path | None) -> None:
        if not is_evaluation(metrics):
            return  # training scalars go to TensorBoard only (Tune needs the metric in every result)
        if on_final is not None and metrics.get("step", 0) >= max_steps:
            on_final(scalars(metrics))
        tune_checkpoint = None
        if checkpoint_dir is not None:
            (checkpoint_dir / "metrics.json").write_text(json.dumps(scalars(metrics)))
            seal_checkpoint(checkpoint_dir)  # the manifest now covers metrics.json too
            tune_checkpoint = ray.tune.Checkpoint.from_directory(str(checkpoint_dir))
        ray.tune.report(metrics, checkpoint=tune_checkpoint)

    use_cuda = bool(ray.get_gpu_ids()) and torch.cuda.is_available()
    metrics = run_in_process(settings, report, device=torch.device("cuda" if use_cuda else "cpu"), resume=resume)
    return scalars(metrics), False


def _checkpoint_uri(checkpoint, trial_location: str) -> str:
    """The location of a Tune checkpoint: a local path, or its URI on the trial's remote storage
    (``Checkpoint.path`` is a path on ``Checkpoint.filesystem``, without the URI's scheme)."""
    name = Path(checkpoint.path).name
    return join(trial_location, name) if StoragePath(trial_location).is_remote else checkpoint.path


def _checkpoint_step(folder: StoragePath | None) -> int:
    """The step a checkpoint (local or remote) was written at; -1 without a readable trainer state."""
    if folder is None:
        return -1
    try:
        return int((folder / TRAINER_STATE).read_json()["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def newest_trial_checkpoint(trial_dir: Path | StoragePath) -> tuple[int, StoragePath] | None:
    """The highest-step complete Tune checkpoint in an inline trial's folder (local or remote),
    as (step, location).

    Complete means every file of its manifest is there with its recorded size and SHA-256
    (on remote storage: its size; the copy's checksums are verified when it is loaded): a
    driver killed while Tune was copying a checkpoint leaves a partial folder, and a folder
    rewritten in place can hold old and new files side by side; both are skipped (with a
    warning).
    """
    place = StoragePath(trial_dir)
    if not place.is_remote:
        found = [pair for pair in complete_checkpoints(place.local(), "checkpoint_*") if pair[0] >= 0]
        step, folder = max(found, key=lambda pair: pair[0]) if found else (None, None)
        return (step, StoragePath(folder)) if folder is not None else None
    # Remote storage: sizes against the manifest (the SHA-256 is checked when the copy is loaded).
    best = None
    for folder in place.iterdir():
        if not folder.name.startswith("checkpoint_"):
            continue
        try:
            manifest = (folder / MANIFEST_FILE).read_json()
            files = manifest["files"] if isinstance(manifest.get("files"), dict) else manifest
            sizes = {name: entry["size"] if isinstance(entry, dict) else entry for name, entry in files.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        present = folder.files()
        if not all(name in present and present[name][0] == size for name, size in sizes.items()):
            logger.warning("skipped: checkpoint %s is incomplete (its files differ from its manifest)", folder)
            continue
        step = _checkpoint_step(folder)
        if step >= 0 and (best is None or step > best[0]):
            best = (step, folder)
    return best


def _complete(folder: Path) -> bool:
    from ..run.checkpoint import CheckpointError, verify_checkpoint

    try:
        verify_checkpoint(folder)
        return True
    except CheckpointError as error:
        logger.warning("Tune's restored checkpoint is not usable: %s", error)
        return False


def skip_existing_checkpoint_names(trial_dir: Path | StoragePath) -> None:
    """Moves Tune's checkpoint counter of this trial past the ``checkpoint_<index>`` folders there.

    A resumed trial starts counting at the index of the experiment state Tune saved last,
    which can be behind what the killed run had written; its next checkpoint would then be
    copied file by file over an existing folder.
    """
    from ray.train._internal.session import get_session

    storage = getattr(get_session(), "storage", None)
    indices = [int(p.name.split("_", 1)[1]) for p in StoragePath(trial_dir).iterdir()
               if p.name.startswith("checkpoint_") and p.name.split("_", 1)[1].isdigit()]
    if storage is not None and indices and storage.current_checkpoint_index < max(indices):
        logger.info("checkpoint index %d -> %d: %s already holds later checkpoints", storage.current_checkpoint_index,
                    max(indices), trial_dir)
        storage.current_checkpoint_index = max(indices)


def _recorded_final_metrics(run_dir: StoragePath, max_steps: int) -> dict | None:
    """Final metrics of the trial's Ray Train run if it already reached ``max_steps`` (else None)."""
    if not (run_dir / "checkpoint_manager_snapshot.json").is_file():
        return None
    from ray.train import Result

    try:
        metrics = Result.from_path(str(run_dir)).metrics or {}
    except (RuntimeError, ValueError, OSError):
        return None
    if int(metrics.get("step", -1)) >= max_steps and any(k.startswith("val/") for k in metrics):
        return scalars(metrics)
    return None
