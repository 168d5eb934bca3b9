"""``medalign status EXP_DIR``: leaderboard, best config, importances and one TensorBoard per sweep.

``write_results("sweeps/synthmed_vqa-smoke")`` (re)generates, inside the experiment folder
of a sweep (or of ``medalign ablate-layers``, which is one)::

    results/leaderboard.csv       one row per Tune trial, ranked by the sweep's first metric
    results/leaderboard.md        the same table in Markdown (sample-count columns left out)
    results/best_experiment.yaml  the best finished trial as an experiment file:
                                  ``medalign train experiment=<that path>`` runs exactly its config
    results/importances.json|png  Optuna parameter importances of the SQLite study
    results/history.png           each trial's metric vs its trial number, with the running best
    tensorboard/                  one run per trial (``trial_<id>/``): searched values as HParams,
                                  val/* and test/* curves copied from the trial's own events

Everything is read from the folder (``sweep.json``, Tune's experiment state, ``optuna.db``,
the trials' ``final.json`` and event files), so it works on a running sweep: running trials
show their latest evaluation. Each file is written to a temporary name and renamed, and the
TensorBoard folder is built beside the old one and swapped in, so a reader (or a running
TensorBoard) never sees a half-written file.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..common.atomic import move_into_place, replaced_atomically, write_text_atomic
from ..run.compose import ConfigError

logger = logging.getLogger(__name__)

RESULTS_DIR = "results"
TENSORBOARD_DIR = "tensorboard"
LEADERBOARD_CSV = "leaderboard.csv"
LEADERBOARD_MD = "leaderboard.md"
BEST_EXPERIMENT = "best_experiment.yaml"
IMPORTANCES_JSON = "importances.json"
IMPORTANCES_PNG = "importances.png"
HISTORY_PNG = "history.png"
DEFAULT_TOP = 10
EVAL_PREFIXES = ("val/", "test/")
# Columns of every leaderboard row besides the searched parameters and the metrics.
HEAD_COLUMNS = ["rank", "trial_id", "optuna_trial", "status"]
TAIL_COLUMNS = ["step", "max_steps", "stopped_early", "wall_s"]


# --------------------------------------------------------------------------- the folder


def check_experiment_dir(path: str | Path) -> Path:
    """The experiment folder of a sweep, or a ConfigError saying what it is instead and what to pass.

    Raises:
        ConfigError: the path does not exist, is not a sweep folder (no ``sweep.json``), or
            the sweep has not saved Tune's experiment state yet.
    """
    from .sweep import SWEEP_SPEC_FILE

    folder = Path(path).expanduser()
    if not folder.exists():
        raise ConfigError(f"{path} does not exist; pass the experiment folder of a sweep: "
                          f"<sweep.output_dir>/<sweep.name>, e.g. sweeps/synthmed_vqa-smoke")
    if not folder.is_dir():
        raise ConfigError(f"{path} is a file; pass the experiment folder of a sweep (the folder holding sweep.json)")
    if not (folder / SWEEP_SPEC_FILE).is_file():
        hint = "pass the folder that `medalign sweep` or `medalign ablate-layers` wrote (it holds sweep.json)"
        inside = sorted(p.parent.name for p in folder.glob(f"*/{SWEEP_SPEC_FILE}"))
        if inside:
            hint = f"it holds the sweeps {inside}: pass one of them, e.g. {folder / inside[0]}"
        elif (folder.parent / SWEEP_SPEC_FILE).is_file():
            hint = f"it is inside the sweep folder {folder.parent}: pass that"
        raise ConfigError(f"{path} is not a sweep folder (no {SWEEP_SPEC_FILE}); {hint}")
    if not any(folder.glob("experiment_state-*.json")):
        raise ConfigError(f"{path}: the sweep has not saved Ray Tune's experiment state yet (it is still starting); "
                          f"run `medalign status {path}` again once its first trial runs")
    return folder.resolve()


def _atomic_figure(figure, path: Path) -> Path:
    with replaced_atomically(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path


def live_records(records: Sequence[dict]) -> list[dict]:
    """Trial records with the status a running sweep really has.

    Tune's saved experiment state turns RUNNING trials into PENDING when it is loaded (ready
    to be restarted), so a PENDING trial that has already reported a result is running.
    """
    return [{**r, "status": "RUNNING"} if r["status"] == "PENDING" and r["metrics"].get("step") is not None else r
            for r in records]


def finite_number(value: Any) -> int | float | None:
    """``value`` if it is a finite int or float, else None (strings, bools, NaN and missing values)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


# --------------------------------------------------------------------------- the study


def _load_study(experiment_dir: Path, study_name: str):
    """The sweep's Optuna study in ``EXP_DIR/optuna.db``, or None when there is none yet.

    Opened at the folder's own path (not the one recorded in ``sweep.json``), so a copied or
    moved experiment folder reads its own study and never creates an empty database.
    """
    import optuna

    from .sweep import STUDY_FILE

    database = experiment_dir / STUDY_FILE
    if not database.is_file():
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(f"sqlite:///{database}", engine_kwargs={"connect_args": {"timeout": 60}})
    try:
        return optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        return None


def optuna_numbers(study) -> dict[str, int]:
    """``{tune trial id: Optuna trial number}`` from the ``tune_trial_id`` user attribute."""
    if study is None:
        return {}
    return {t.user_attrs["tune_trial_id"]: t.number for t in study.get_trials(deepcopy=False)
            if "tune_trial_id" in t.user_attrs}


def param_importances(study, metrics: Sequence[str], modes: Sequence[str]) -> dict:
    """Optuna parameter importances of the study, one entry per objective.

    Uses ``optuna.importance.get_param_importances`` with its default evaluator (PED-ANOVA
    in Optuna 5) over the parameters whose value varies among completed trials. For a
    multi-objective study each objective gets its own ``target``; PED-ANOVA counts low
    targets as good, so maximised objectives are negated.

    Returns:
        ``{"completed_trials", "evaluator", "objectives": [{"metric", "mode", "importances":
        {param: share} (sums to 1), "reason": None or why there are none}]}``; parameter
        names are the search-space keys (``distill.layer``).
    """
    import optuna

    out: dict = {"completed_trials": 0, "evaluator": "optuna default (PedAnovaImportanceEvaluator)", "objectives": []}
    reason = None
    if study is None:
        reason = "no Optuna study in the experiment folder yet"
        complete = []
    else:
        complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        out["completed_trials"] = len(complete)
    varied = sorted({name for t in complete for name in t.params
                     if len({repr(u.params.get(name)) for u in complete}) > 1})
    if reason is None and len(complete) < 2:
        reason = f"{len(complete)} completed trial(s): importances need at least 2"
    elif reason is None and not varied:
        reason = f"no searched parameter varies among the {len(complete)} completed trials"
    for index, (metric, mode) in enumerate(zip(metrics, modes)):
        entry = {"metric": metric, "mode": mode, "importances": {}, "reason": reason}
        if reason is None:
            entry["importances"] = _importances(study, varied, index, mode, len(metrics) > 1)
            if len(varied) > 1 and len(set(entry["importances"].values())) == 1:
                entry["note"] = ("equal shares: too few trials, or none stands out, for the evaluator to tell the "
                                 "parameters apart")
        out["objectives"].append(entry)
    return out


def _importances(study, params: list[str], index: int, mode: str, multi_objective: bool) -> dict[str, float]:
    import optuna

    target = None
    if multi_objective:
        sign = -1.0 if mode == "max" else 1.0
        target = lambda trial: sign * trial.values[index]
    with warnings.catch_warnings():  # "too few trials" / "lower target is better": recorded as a note instead
        warnings.simplefilter("ignore")
        values = optuna.importance.get_param_importances(study, params=params, target=target)
    return {name.replace("/", "."): float(share) for name, share in values.items()}


# --------------------------------------------------------------------------- the leaderboard


def metric_columns(metrics: Sequence[str], records: Sequence[dict]) -> list[str]:
    """The sweep metrics first, then every other val/* and then test/* metric the trials report."""
    seen = {k for r in records for k, v in r["metrics"].items()
            if k.startswith(EVAL_PREFIXES) and finite_number(v) is not None and k not in metrics
            and not _is_breakdown(k)}
    return [*metrics, *sorted(k for k in seen if k.startswith("val/")),
            *sorted(k for k in seen if k.startswith("test/"))]


def _is_breakdown(column: str) -> bool:
    """``val/by_qtype/pres/closed_accuracy`` and the like: per-question-type breakdowns stay in the
    trial's results and TensorBoard, out of the leaderboard (dozens of columns on VQA-RAD)."""
    return "/by_qtype/" in column


def _is_count(column: str) -> bool:
    """``val/n_closed`` and the like: sample counts, not metrics."""
    return column.startswith(EVAL_PREFIXES) and column.split("/", 1)[1].startswith("n_")


def leaderboard_rows(records: Sequence[dict], param_keys: Sequence[str], metrics: Sequence[str],
                     modes: Sequence[str], numbers: dict[str, int], pareto_ids: set[str] | None = None
                     ) -> tuple[list[str], list[dict]]:
    """One row per trial, ranked by the first metric (trials without it last, in trial order).

    Args:
        records: :func:`medalign_platform.tune.sweep.trial_records` output.
        param_keys: the search-space keys, in column order.
        metrics, modes: the sweep metrics and their min/max modes.
        numbers: Optuna trial number per Tune trial id.
        pareto_ids: Tune trial ids on the Pareto front (multi-objective sweeps), else None.

    Returns:
        the column names and the rows (dicts keyed by them; missing values are None).
    """
    values = metric_columns(metrics, records)
    columns = [*HEAD_COLUMNS, *param_keys, *values, *TAIL_COLUMNS, *(["pareto"] if pareto_ids is not None else [])]
    metric, sign = metrics[0], (-1.0 if modes[0] == "max" else 1.0)

    def order(item: tuple[int, dict]) -> tuple:
        position, record = item
        score = finite_number(record["metrics"].get(metric))
        return (score is None, sign * score if score is not None else 0.0, position)

    rows = []
    for rank, (_, record) in enumerate(sorted(enumerate(records), key=order), start=1):
        step = record["metrics"].get("step")
        max_steps = record["config"].get("trainer", {}).get("max_steps")
        wall = record.get("trial_wall_s")
        row = {"rank": rank, "trial_id": record["trial_id"], "optuna_trial": numbers.get(record["trial_id"]),
               "status": record["status"],
               **{key: record["params"].get(key) for key in param_keys},
               **{key: finite_number(record["metrics"].get(key)) for key in values},
               "step": step, "max_steps": max_steps,
               # ASHA stops a trial by ending it before its last step; Tune marks it TERMINATED.
               "stopped_early": bool(record["status"] == "TERMINATED" and isinstance(step, int)
                                     and isinstance(max_steps, int) and step < max_steps),
               "wall_s": finite_number(wall if wall is not None else record.get("time_total_s"))}
        if pareto_ids is not None:
            row["pareto"] = record["trial_id"] in pareto_ids
        rows.append(row)
    return columns, rows


def write_leaderboard_csv(columns: Sequence[str], rows: Sequence[dict], path: Path) -> Path:
    """All columns, full precision (``repr`` of floats), empty cells for missing values."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in columns})
    return write_text_atomic(path, buffer.getvalue())


def _cell(column: str, value: Any, digits: int = 4) -> str:
    if value is None:
        return ""
    if column in ("stopped_early", "pareto"):
        return "yes" if value else ""
    if column == "wall_s":
        return f"{value:.1f}"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value).replace("|", "\\|")


def leaderboard_markdown(columns: Sequence[str], rows: Sequence[dict], top: int | None = None,
                         metrics: Sequence[str] = ()) -> str:
    """The leaderboard as a Markdown table (first ``top`` rows), without sample-count columns.

    Numbers have 4 significant digits, the sweep ``metrics`` 6 (close trials stay apart);
    ``step`` shows ``reached/max``; ``stopped_early`` is ``yes`` for trials ASHA stopped.
    """
    shown = [c for c in columns if not _is_count(c) and c != "max_steps"]
    lines = ["| " + " | ".join(shown) + " |", "|" + "|".join(" --- " for _ in shown) + "|"]
    for row in rows[:top] if top else rows:
        cells = []
        for column in shown:
            if column == "step":
                cells.append(f"{_cell('step', row['step'])}/{_cell('max_steps', row['max_steps'])}")
            else:
                cells.append(_cell(column, row.get(column), 6 if column in metrics else 4))
        lines.append("| " + " | ".join(cells) + " |")
    if top and len(rows) > top:
        lines.append(f"\n({len(rows) - top} more trial(s) in {LEADERBOARD_CSV})")
    return "\n".join(lines) + "\n"


def _leaderboard_document(summary: dict, name: str, columns: list[str], rows: list[dict], top: int | None) -> str:
    metric, mode = summary["metrics"][0], summary["modes"][0]
    counts = ", ".join(f"{count} {status}" for status, count in sorted(summary["trials"].items()))
    header = [f"# Sweep {name}: leaderboard", "",
              (f"{summary['num_trials']} trials ({counts}); ranked by `{metric}` ({mode}), the sweep's first metric; "
               f"trials without it last. Sampler: {summary['sampler']}; early stopping: {summary['early_stopping']}."),
              ("Running trials show their latest evaluation. `step` is reached/max; `stopped_early`: stopped by ASHA. "
               f"Sample counts (`*/n_*`) are in {LEADERBOARD_CSV} only."), ""]
    return "\n".join(header) + leaderboard_markdown(columns, rows, top, summary["metrics"])


# --------------------------------------------------------------------------- the best config


def group_choices(overrides: Sequence[str]) -> dict[str, str | None]:
    """The config group options (``data: synthmed_vqa``, ...) that ``overrides`` compose, without
    the ``experiment`` preset and Hydra's own groups."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    from ..run.compose import experiment_file_overrides, experiments_dir

    try:
        with (experiment_file_overrides(overrides) as composed_overrides,
              initialize_config_dir(config_dir=str(experiments_dir()), version_base="1.3")):
            composed = compose(config_name="config", overrides=composed_overrides, return_hydra_config=True)
            choices = OmegaConf.to_container(composed.hydra.runtime.choices)
    except HydraException as error:
        raise ConfigError(f"cannot compose the sweep's base config again: {error}") from error
    return {k: v for k, v in choices.items() if not k.startswith("hydra") and k != "experiment"}


def best_run_config(best: dict, base_config: dict, sweep_name: str) -> dict:
    """The best trial's run config with its sweep-trial paths replaced by a plain run's."""
    config = json.loads(json.dumps(best["config"]))  # a deep copy with plain lists
    config["run"] = {"name": f"{sweep_name}-best", "output_dir": base_config.get("run", {}).get("output_dir", "runs")}
    return config


def _without_run(config: dict) -> dict:
    return {k: v for k, v in config.items() if k != "run"}


def _differences(expected: Any, got: Any, prefix: str = "") -> list[str]:
    """Dotted keys where two plain configs differ."""
    if isinstance(expected, dict) and isinstance(got, dict):
        out = []
        for key in sorted(set(expected) | set(got), key=str):
            out += _differences(expected.get(key, "<missing>"), got.get(key, "<missing>"), f"{prefix}{key}.")
        return out
    return [] if expected == got and type(expected) is type(got) else [prefix.rstrip(".")]


def best_experiment_text(config: dict, choices: dict | None, header: Sequence[str]) -> str:
    """An experiment YAML (``# @package _global_``) that composes exactly ``config``.

    The ``defaults`` list selects the same config group options as the sweep's base config
    (so every section has the same keys); the body sets every value, so nothing depends on
    the presets' current defaults.
    """
    import yaml

    class Dumper(yaml.SafeDumper):
        """Block mappings, one-line lists (``betas: [0.9, 0.999]``)."""

    Dumper.add_representer(list, lambda dumper, data: dumper.represent_sequence(
        "tag:yaml.org,2002:seq", data, flow_style=True))
    lines = ["# @package _global_", *(f"# {line}" if line else "#" for line in header), ""]
    if choices:
        # Hydra lists runtime choices last-composed first; the root config's order reads better.
        defaults = [f"  - override /{group}: {yaml.safe_dump(option).splitlines()[0]}"
                    for group, option in reversed(choices.items())]
        lines += ["defaults:", *defaults]
    lines.append(yaml.dump(config, Dumper=Dumper, sort_keys=False, default_flow_style=False, width=120).rstrip())
    return "\n".join(lines) + "\n"


def verify_experiment_file(path: Path, expected: dict) -> list[str]:
    """Composes ``experiment=<path>`` and returns the keys where it differs from ``expected``
    (``run`` aside); ``["<error>"]`` when it does not compose."""
    from ..run.compose import compose_config

    try:
        composed = compose_config([f"experiment={path}"])
    except ConfigError as error:
        return [f"does not compose: {error}"]
    return _differences(_without_run(expected), _without_run(composed))


def write_best_experiment(summary: dict, spec: dict, numbers: dict[str, int], path: Path) -> dict:
    """Writes ``best_experiment.yaml`` for the best finished trial and checks that it composes to it.

    Returns:
        ``{"path", "trial_id", "differences": [keys where composing differs], "command"}``, or
        ``{"path": None, "reason": ...}`` when no trial has finished with the metric yet.
    """
    best = summary["best"]
    metric, mode = summary["metrics"][0], summary["modes"][0]
    if best is None:
        return {"path": None, "reason": f"no finished trial reports {metric} yet"}
    settings = spec["settings"]
    config = best_run_config(best, spec["base_config"], settings["name"])
    try:
        choices = group_choices(spec["config_overrides"])
    except ConfigError as error:  # e.g. the experiment file the sweep was started from is gone
        logger.warning("best_experiment.yaml without a defaults list: %s", error)
        choices = None
    record = next(r for r in summary["records"] if r["trial_id"] == best["trial_id"])
    step, max_steps = record["metrics"].get("step"), config["trainer"].get("max_steps")
    values = ", ".join(f"{m} = {best['metrics'].get(m)}" for m in summary["metrics"])
    params = ", ".join(f"{k}={v}" for k, v in best["params"].items())
    command = f"medalign train experiment={path}"
    header = [f"Best trial of sweep {settings['name']} ({summary['experiment_dir']}), written by `medalign status`.",
              (f"  trial {best['trial_id']} (Optuna trial {numbers.get(best['trial_id'])}), step {step}/{max_steps}; "
               f"best by {metric} ({mode}) among finished trials"),
              f"  {values}",
              f"  searched: {params}",
              "The trial's full resolved run config; only run.name and run.output_dir are new.",
              f"Run it:          {command}",
              (f"Sweep around it: medalign sweep experiment={path} search={settings['search']} "
               f"sweep.name={settings['name']}-refine")]
    check = path.with_name(f".check.{uuid.uuid4().hex[:8]}.yaml")
    check.write_text(best_experiment_text(config, choices, header))
    try:
        differences = verify_experiment_file(check, config)
    finally:
        check.unlink(missing_ok=True)
    header.append("Checked when written: composes to exactly the trial's config" if not differences else
                  f"WARNING: composing this file differs from the trial's config at {differences}")
    write_text_atomic(path, best_experiment_text(config, choices, header))
    return {"path": str(path), "trial_id": best["trial_id"], "differences": differences, "command": command}


# --------------------------------------------------------------------------- plots


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # no pyplot: no global backend, Agg canvas for savefig

    return Figure(figsize=(width, height))


def plot_importances(importances: dict, path: Path, title: str) -> Path:
    """Horizontal bars, one panel per objective; a panel says why when there are no importances."""
    objectives = importances["objectives"]
    figure = _figure(6.5, 0.9 + 2.6 * len(objectives))
    for index, entry in enumerate(objectives, start=1):
        axes = figure.add_subplot(len(objectives), 1, index)
        axes.set_title(f"{title}: importance for {entry['metric']} ({entry['mode']})", fontsize=10)
        shares = entry["importances"]
        if not shares:
            axes.text(0.5, 0.5, entry["reason"], ha="center", va="center", wrap=True, fontsize=9)
            axes.set_axis_off()
            continue
        names = list(shares)[::-1]  # most important on top
        bars = axes.barh(names, [shares[n] for n in names], color="#4477aa")
        axes.bar_label(bars, labels=[f"{shares[n]:.2f}" for n in names], padding=2, fontsize=8)
        axes.set_xlim(0, max(1.0, max(shares.values()) * 1.15))
        axes.set_xlabel("share of importance (sums to 1)" + (f"\n{entry['note']}" if entry.get("note") else ""))
    figure.tight_layout()
    return _atomic_figure(figure, path)


STATUS_STYLE = {  # marker, colour, label
    "finished": ("o", "#4477aa", "finished"),
    "stopped": ("v", "#ee7733", "stopped early (ASHA)"),
    "running": ("s", "#228833", "running (latest)"),
    "other": ("x", "#cc3311", "error / pending"),
}


def _kind(row: dict) -> str:
    if row["status"] == "TERMINATED":
        return "stopped" if row["stopped_early"] else "finished"
    return "running" if row["status"] == "RUNNING" else "other"


def plot_history(rows: Sequence[dict], metrics: Sequence[str], modes: Sequence[str], path: Path, title: str) -> Path:
    """Each trial's metric vs its trial number (Optuna's, else Tune's order) and the running
    best of the finished trials, one panel per sweep metric."""
    from matplotlib.ticker import MaxNLocator

    figure = _figure(7.0, 0.6 + 3.0 * len(metrics))
    ordered = sorted(rows, key=lambda r: (r["optuna_trial"] is None, r["optuna_trial"] or 0, r["trial_id"]))
    x_of = {r["trial_id"]: (r["optuna_trial"] if r["optuna_trial"] is not None else i) for i, r in enumerate(ordered)}
    for index, (metric, mode) in enumerate(zip(metrics, modes), start=1):
        axes = figure.add_subplot(len(metrics), 1, index)
        for kind, (marker, colour, label) in STATUS_STYLE.items():
            points = [(x_of[r["trial_id"]], r[metric]) for r in ordered if _kind(r) == kind and r[metric] is not None]
            if points:
                axes.scatter(*zip(*points), marker=marker, color=colour, label=label, zorder=3)
        best_x, best_y, best = [], [], None
        for row in ordered:
            value = row[metric]
            if row["status"] == "TERMINATED" and value is not None:
                best = value if best is None else (max(best, value) if mode == "max" else min(best, value))
            if best is not None:
                best_x.append(x_of[row["trial_id"]])
                best_y.append(best)
        if best_x:
            axes.step(best_x, best_y, where="post", color="black", linewidth=1.2, label=f"running best ({mode})")
        axes.set_ylabel(metric)
        axes.set_title(f"{title}: {metric} per trial", fontsize=10)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7, loc="best")
    axes.set_xlabel("trial number (Optuna)")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.tight_layout()
    return _atomic_figure(figure, path)


# --------------------------------------------------------------------------- TensorBoard


def _hparam_value(value: Any) -> bool | int | float | str:
    if isinstance(value, (bool, int, float, str)):
        return value
    return "none" if value is None else str(value)


def _domain(entry: dict):
    """The HParams domain of a search-space entry (None for rules and mixed-type choices)."""
    from tensorboard.plugins.hparams import summary_v2 as hp

    kind = entry.get("type")
    if kind in ("loguniform", "uniform"):
        return hp.RealInterval(float(entry["low"]), float(entry["high"]))
    if kind == "int":
        return hp.IntInterval(int(entry["low"]), int(entry["high"]))
    values = entry.get("values") if kind in ("choice", "grid") else [entry.get("value")] if kind == "fixed" else None
    if not values:
        return None
    values = [_hparam_value(v) for v in values]
    types = {bool if isinstance(v, bool) else str if isinstance(v, str) else float for v in values}
    if len(types) != 1:
        return None
    return hp.Discrete([float(v) for v in values] if types == {float} else values)


def _plugin_summary(tag: str, plugin_data):
    """A summary holding hparams plugin data (what ``summary_v2`` builds for the other two kinds)."""
    from tensorboard.compat.proto import summary_pb2
    from tensorboard.plugins.hparams import metadata

    summary = summary_pb2.Summary()
    summary.value.add(tag=tag, metadata=metadata.create_summary_metadata(plugin_data), tensor=metadata.NULL_TENSOR)
    return summary


def _write_events(folder: Path, events: Sequence[tuple[float, int, Any]]) -> None:
    """Writes ``(wall_time, step, Summary)`` events to a new event file in ``folder``."""
    from tensorboard.compat.proto import event_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    writer = EventFileWriter(str(folder))
    try:
        for wall_time, step, summary in events:
            writer.add_event(event_pb2.Event(wall_time=wall_time, step=step, summary=summary))
    finally:
        writer.close()


def trial_curves(event_dir: Path) -> dict[str, list[tuple[float, int, float]]]:
    """val/* and test/* scalars of a trial's own TensorBoard events: ``{tag: [(wall_time, step, value)]}``.

    Read with TensorBoard's ``EventAccumulator``. One value per step, the last written: a
    resumed trial may log an evaluation twice.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not event_dir.is_dir() or not any(event_dir.glob("*tfevents*")):
        return {}
    skip = {"images": 1, "audio": 1, "histograms": 1, "compressedHistograms": 1, "tensors": 1}
    events = EventAccumulator(str(event_dir), size_guidance={"scalars": 0, **skip})
    events.Reload()
    curves = {}
    for tag in events.Tags()["scalars"]:
        if tag.startswith(EVAL_PREFIXES) and not _is_count(tag):
            by_step = {e.step: (e.wall_time, e.step, e.value) for e in events.Scalars(tag)}
            curves[tag] = [by_step[s] for s in sorted(by_step)]
    return curves


def _trial_events(record: dict, params: dict, curves: dict) -> list[tuple[float, int, Any]]:
    from tensorboard.compat.proto import summary_pb2
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
    from tensorboard.plugins.hparams import summary_v2 as hp

    if not curves:  # no event files (yet): the last reported evaluation, so the trial still compares
        step = record["metrics"].get("step") or 0
        curves = {k: [(time.time(), step, v)] for k, v in record["metrics"].items()
                  if k.startswith(EVAL_PREFIXES) and not _is_count(k) and finite_number(v) is not None}
    started = min((points[0][0] for points in curves.values()), default=time.time())
    events = [(started, 0, hp.hparams_pb(params, trial_id=record["trial_id"], start_time_secs=started))]
    for tag, points in curves.items():
        for wall_time, step, value in points:
            events.append((wall_time, step, summary_pb2.Summary(value=[summary_pb2.Summary.Value(
                tag=tag, simple_value=value)])))
    status = {"TERMINATED": api_pb2.STATUS_SUCCESS, "ERROR": api_pb2.STATUS_FAILURE}.get(record["status"])
    if status is not None:  # running and pending trials have no session end yet
        ended = max((p[-1][0] for p in curves.values()), default=started)
        end = plugin_data_pb2.HParamsPluginData(session_end_info=plugin_data_pb2.SessionEndInfo(
            status=status, end_time_secs=ended))
        last_step = max((p[-1][1] for p in curves.values()), default=0)
        events.append((ended, last_step, _plugin_summary(metadata.SESSION_END_INFO_TAG, end)))
    return events


def write_tensorboard(experiment_dir: Path, records: Sequence[dict], search_space: dict,
                      metrics: Sequence[str]) -> Path:
    """``EXP_DIR/tensorboard/``: one run per trial plus an experiment-level HParams config.

    Each ``trial_<id>/`` run holds an HParams session (the searched values, group = trial
    id; ended with success/failure once Tune finished the trial) and the trial's val/* and
    test/* curves. The root run holds the experiment config (every searched key with its
    domain, every metric) so the HParams dashboard lists and compares all trials. Built in
    a temporary folder and swapped in.
    """
    from tensorboard.plugins.hparams import summary_v2 as hp

    target = experiment_dir / TENSORBOARD_DIR
    building = experiment_dir / f".{TENSORBOARD_DIR}.{uuid.uuid4().hex[:8]}.tmp"
    building.mkdir()
    keys = [k for k in search_space if k != "points_to_evaluate"]
    tags: set[str] = set()
    for record in records:
        curves = trial_curves(Path(record["path"]) / "tensorboard")
        params = {key: _hparam_value(record["params"].get(key)) for key in keys}
        run = building / f"trial_{record['trial_id']}"
        run.mkdir()
        events = _trial_events(record, params, curves)
        _write_events(run, events)
        tags.update(s.value[0].tag for _, _, s in events if s.value and s.value[0].tag.startswith(EVAL_PREFIXES))
    ordered = [*[m for m in metrics if m in tags], *sorted(t for t in tags if t not in metrics)]
    config = hp.hparams_config_pb(
        hparams=[hp.HParam(key, _domain(search_space[key])) for key in keys],
        metrics=[hp.Metric(tag, dataset_type=hp.Metric.VALIDATION if tag.startswith("val/") else None)
                 for tag in ordered])
    _write_events(building, [(time.time(), 0, config)])
    move_into_place(building, target)
    return target


# --------------------------------------------------------------------------- everything


def write_results(experiment_dir: str | Path, *, top: int | None = None) -> dict:
    """(Re)generates ``EXP_DIR/results/`` and ``EXP_DIR/tensorboard/`` (see the module doc).

    Safe on a running sweep; each file is replaced atomically.

    Args:
        experiment_dir: the sweep's experiment folder (``<sweep.output_dir>/<sweep.name>``).
        top: rows of ``leaderboard.md`` and of the returned ``leaderboard`` (None: all);
            ``leaderboard.csv`` always has every trial.

    Returns:
        ``experiment_dir``, ``name``, ``metrics``/``modes``, ``trials`` (count by status),
        ``num_trials``, ``early_stopping``, ``sampler``, ``search``, ``files`` (name -> path),
        ``best`` (the sweep summary's best finished trial plus its ``optuna_trial``; None
        before one finishes), ``best_experiment`` (the YAML's ``path``, the ``command`` to run
        it and the ``differences`` found composing it; else a ``reason``), ``pareto`` (Tune
        trial ids, multi-objective; else None), ``importances``, ``columns`` and
        ``leaderboard`` (the ranked rows).

    Raises:
        ConfigError: not a sweep folder (see :func:`check_experiment_dir`).
    """
    from .sweep import summarize

    folder = check_experiment_dir(experiment_dir)
    spec = json.loads((folder / "sweep.json").read_text())
    name = spec["settings"]["name"]
    summary = summarize(folder)
    summary["records"] = live_records(summary["records"])
    summary["trials"] = {}
    for record in summary["records"]:
        summary["trials"][record["status"]] = summary["trials"].get(record["status"], 0) + 1
    study = _load_study(folder, name)
    numbers = optuna_numbers(study)
    pareto_ids = None
    if summary["pareto"] is not None:
        by_number = {number: trial_id for trial_id, number in numbers.items()}
        pareto_ids = {by_number[p["number"]] for p in summary["pareto"] if p["number"] in by_number}
    keys = [k for k in spec["search_space"] if k != "points_to_evaluate"]
    columns, rows = leaderboard_rows(summary["records"], keys, summary["metrics"], summary["modes"], numbers,
                                     pareto_ids)

    results = folder / RESULTS_DIR
    results.mkdir(exist_ok=True)
    files = {"leaderboard_csv": write_leaderboard_csv(columns, rows, results / LEADERBOARD_CSV),
             "leaderboard_md": write_text_atomic(results / LEADERBOARD_MD,
                                            _leaderboard_document(summary, name, columns, rows, top))}
    best_yaml = write_best_experiment(summary, spec, numbers, results / BEST_EXPERIMENT)
    if best_yaml["path"]:
        files["best_experiment"] = Path(best_yaml["path"])
    importances = param_importances(study, summary["metrics"], summary["modes"])
    importances.update(study=name, storage=f"sqlite:///{folder / 'optuna.db'}")
    files["importances_json"] = write_text_atomic(results / IMPORTANCES_JSON, json.dumps(importances, indent=1) + "\n")
    files["importances_png"] = plot_importances(importances, results / IMPORTANCES_PNG, name)
    files["history_png"] = plot_history(rows, summary["metrics"], summary["modes"], results / HISTORY_PNG, name)
    files["tensorboard"] = write_tensorboard(folder, summary["records"], spec["search_space"], summary["metrics"])

    best = None
    if summary["best"] is not None:
        best = {**summary["best"], "optuna_trial": numbers.get(summary["best"]["trial_id"])}
    return {
        "experiment_dir": str(folder), "name": name, "metrics": summary["metrics"], "modes": summary["modes"],
        "trials": summary["trials"], "num_trials": summary["num_trials"], "sampler": summary["sampler"],
        "early_stopping": summary["early_stopping"], "search": spec["settings"]["search"],
        "files": {k: str(v) for k, v in files.items()},
        "best": best, "best_experiment": best_yaml, "pareto": sorted(pareto_ids) if pareto_ids is not None else None,
        "importances": importances, "columns": columns, "leaderboard": rows[:top] if top else rows,
    }


# --------------------------------------------------------------------------- the command


def parse_status_overrides(overrides: Sequence[str]) -> dict:
    """``top=N`` (rows printed, default 10); anything else is a ConfigError naming the valid keys."""
    options = {"top": DEFAULT_TOP}
    for text in overrides:
        key, _, value = text.partition("=")
        if key != "top":
            raise ConfigError(f"medalign status: unknown option {text!r}; valid: top=N (leaderboard rows printed, "
                              f"default {DEFAULT_TOP})")
        if not value.isdigit() or int(value) < 1:
            raise ConfigError(f"medalign status: top={value!r} must be a whole number >= 1, e.g. top=20")
        options["top"] = int(value)
    return options


def _format(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def status_report(result: dict, top: int) -> str:
    """What ``medalign status`` prints: leaderboard, best trial, importances, files, commands."""
    counts = ", ".join(f"{n} {s}" for s, n in sorted(result["trials"].items()))
    lines = [f"Sweep {result['name']} ({result['experiment_dir']}): {result['num_trials']} trials ({counts})",
             (f"  metric: {', '.join(f'{m} ({o})' for m, o in zip(result['metrics'], result['modes']))}; "
              f"sampler {result['sampler']}; early stopping: {result['early_stopping']}"), "",
             leaderboard_markdown(result["columns"], result["leaderboard"], top, result["metrics"])]
    best = result["best"]
    if best is None:
        lines.append(f"Best trial: none yet ({result['best_experiment']['reason']}).")
    else:
        row = next((r for r in result["leaderboard"] if r["trial_id"] == best["trial_id"]), {})
        lines += [(f"Best trial {best['trial_id']} (Optuna trial {best['optuna_trial']}, rank {row.get('rank')}, "
                   f"step {row.get('step')}/{row.get('max_steps')}):"),
                  "  metrics: " + ", ".join(f"{k} = {_format(v)}" for k, v in best["all_metrics"].items()
                                             if not _is_count(k) and not _is_breakdown(k)),
                  "  params:  " + ", ".join(f"{k}={_format(v)}" for k, v in best["params"].items())]
    if result["pareto"] is not None:
        lines.append(f"Pareto front ({', '.join(result['metrics'])}): trials {', '.join(result['pareto'])}")
    for entry in result["importances"]["objectives"]:
        shares = ", ".join(f"{k} {v:.2f}" for k, v in entry["importances"].items()) or entry["reason"]
        lines.append(f"Importances for {entry['metric']}: {shares}")
    lines += ["", "Files:"] + [f"  {path}" for path in result["files"].values()]
    yaml_info = result["best_experiment"]
    if yaml_info["path"]:
        lines += ["", f"Run the best config:  {yaml_info['command']}"]
        if yaml_info["differences"]:
            lines.append(f"  WARNING: it composes differently from the trial at {yaml_info['differences']}")
    lines.append(f"Dashboards:           medalign dashboard {result['experiment_dir']}")
    return "\n".join(lines)


def status_command(path: str, overrides: Sequence[str]) -> int:
    """``medalign status EXP_DIR [top=N]``: writes the results and prints a summary.

    Returns:
        0, or 2 (with the problem and the fix on stderr) for a bad path or option.
    """
    import sys

    try:
        options = parse_status_overrides(overrides)
        result = write_results(path)
    except ConfigError as error:
        print(f"medalign status: {error}", file=sys.stderr)
        return 2
    print(status_report(result, options["top"]))
    return 0
