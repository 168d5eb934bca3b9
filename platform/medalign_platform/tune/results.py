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

A sweep on remote storage (``medalign status s3://bucket/sweeps/NAME``) is read from a local
mirror of its records (``$MEDALIGN_CACHE/remote/...``), and ``results/`` and ``tensorboard/``
are built there and uploaded to the sweep folder (replacing the previous upload).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ..common.atomic import write_text_atomic
from ..common.errors import ConfigError
from ..common.overrides import as_tree, parse_overrides
from ..common.settings import Settings, setting
from .best_experiment import write_best_experiment
from ..run.filesystems import StoragePath, is_uri, join, relocate
from .layout import SWEEP_SPEC_FILE, check_experiment_dir, study_storage
from .leaderboard import (LEADERBOARD_CSV, is_breakdown, is_count, leaderboard_document, leaderboard_markdown,
                          leaderboard_rows, write_leaderboard_csv)
from .records import summarize
from .study_report import load_study, optuna_numbers, param_importances, plot_history, plot_importances
from .sweep_tensorboard import write_tensorboard

RESULTS_DIR = "results"
LEADERBOARD_MD = "leaderboard.md"
BEST_EXPERIMENT = "best_experiment.yaml"
IMPORTANCES_JSON = "importances.json"
IMPORTANCES_PNG = "importances.png"
HISTORY_PNG = "history.png"
DEFAULT_TOP = 10


@dataclass
class StatusOptions(Settings):
    """The ``key=value`` options of ``medalign status EXP_DIR``."""

    section: ClassVar[str] = ""

    top: int = setting(DEFAULT_TOP, "Leaderboard rows printed (every trial is in leaderboard.csv).", ge=1)


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
    if is_uri(experiment_dir):
        return _write_remote_results(StoragePath(experiment_dir), top)
    folder = check_experiment_dir(experiment_dir)
    spec = json.loads((folder / SWEEP_SPEC_FILE).read_text())
    name = spec["settings"]["name"]
    summary = summarize(folder)  # statuses as the sweep's own summary gives them (running or interrupted)
    study = load_study(folder, name)
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
                                            leaderboard_document(summary, name, columns, rows, top))}
    best_yaml = write_best_experiment(summary, spec, numbers, results / BEST_EXPERIMENT)
    if best_yaml["path"]:
        files["best_experiment"] = Path(best_yaml["path"])
    importances = param_importances(study, summary["metrics"], summary["modes"])
    importances.update(study=name, storage=study_storage(folder, spec).url)
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


def _write_remote_results(location: StoragePath, top: int | None) -> dict:
    """:func:`write_results` for a sweep on remote storage: built on a local mirror, then uploaded.

    The returned paths name the remote folder, except ``best_experiment`` (its YAML file and
    command stay local: ``medalign train experiment=`` reads a local file) and ``mirror``.
    """
    local = check_experiment_dir(str(location))
    result = write_results(local, top=top)
    for folder in (RESULTS_DIR, "tensorboard"):
        if (local / folder).is_dir():
            (location / folder).upload(local / folder, replace=True)
    best_yaml = result.pop("best_experiment")
    storage = result["importances"].get("storage", "")
    result = relocate(result, local, location)
    if storage.startswith("sqlite:///") and storage[len("sqlite:///"):].startswith(str(local)):
        result["importances"]["storage"] = join(location, storage[len("sqlite:///") + len(str(local)):])
    result.update(best_experiment=best_yaml, mirror=str(local))
    return result


def parse_status_overrides(overrides: Sequence[str]) -> StatusOptions:
    """``top=N`` (rows printed, default 10); anything else is a ConfigError naming the valid keys."""
    return StatusOptions.from_dict(as_tree(parse_overrides(overrides)))


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
                                             if not is_count(k) and not is_breakdown(k)),
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
    try:
        options = parse_status_overrides(overrides)
        result = write_results(path)
    except ConfigError as error:
        print(f"medalign status: {error}", file=sys.stderr)
        return 2
    print(status_report(result, options.top))
    return 0
