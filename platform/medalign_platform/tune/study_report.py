"""The Optuna study of a sweep, read back: trial numbers, parameter importances, and the two plots.

``importances.png`` (one panel per objective) and ``history.png`` (each trial's metric by
trial number, with the running best) are drawn with matplotlib's object API (no pyplot
state) and written atomically.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

from ..common.atomic import replaced_atomically
from .layout import study_storage


def _atomic_figure(figure, path: Path) -> Path:
    with replaced_atomically(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path


def load_study(experiment_dir: Path, study_name: str):
    """The sweep's Optuna study (``sweep.storage``; by default ``EXP_DIR/optuna.db``), or None
    when there is none yet.

    A file study is opened at the folder's own path (not the one recorded in ``sweep.json``),
    so a copied, moved or mirrored experiment folder reads its own study and never creates an
    empty one.
    """
    import optuna

    storage = study_storage(experiment_dir)
    if storage.kind != "rdb" and not Path(storage.target).is_file():
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=study_name, storage=storage.open())
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
