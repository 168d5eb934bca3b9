"""The sweep leaderboard: one row per trial, ranked by the sweep's first metric (CSV and Markdown)."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..common.atomic import write_text_atomic
from .records import finite_number

LEADERBOARD_CSV = "leaderboard.csv"
EVAL_PREFIXES = ("val/", "test/")
# Columns of every leaderboard row besides the searched parameters and the metrics.
HEAD_COLUMNS = ["rank", "trial_id", "optuna_trial", "status"]
TAIL_COLUMNS = ["step", "max_steps", "stopped_early", "wall_s"]


def metric_columns(metrics: Sequence[str], records: Sequence[dict]) -> list[str]:
    """The sweep metrics first, then every other val/* and then test/* metric the trials report."""
    seen = {k for r in records for k, v in r["metrics"].items()
            if k.startswith(EVAL_PREFIXES) and finite_number(v) is not None and k not in metrics
            and not is_breakdown(k)}
    return [*metrics, *sorted(k for k in seen if k.startswith("val/")),
            *sorted(k for k in seen if k.startswith("test/"))]


def is_breakdown(column: str) -> bool:
    """``val/by_qtype/pres/closed_accuracy`` and the like: per-question-type breakdowns stay in the
    trial's results and TensorBoard, out of the leaderboard (dozens of columns on VQA-RAD)."""
    return "/by_qtype/" in column


def is_count(column: str) -> bool:
    """``val/n_closed``, ``val/by_qtype/count/n_open`` and the like: sample counts, not metrics."""
    return column.startswith(EVAL_PREFIXES) and column.rsplit("/", 1)[-1].startswith("n_")


def leaderboard_rows(records: Sequence[dict], param_keys: Sequence[str], metrics: Sequence[str],
                     modes: Sequence[str], numbers: dict[str, int], pareto_ids: set[str] | None = None
                     ) -> tuple[list[str], list[dict]]:
    """One row per trial, ranked by the first metric (trials without it last, in trial order).

    Args:
        records: :func:`medalign_platform.tune.records.trial_records` output.
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
    shown = [c for c in columns if not is_count(c) and c != "max_steps"]
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


def leaderboard_document(summary: dict, name: str, columns: list[str], rows: list[dict], top: int | None) -> str:
    metric, mode = summary["metrics"][0], summary["modes"][0]
    counts = ", ".join(f"{count} {status}" for status, count in sorted(summary["trials"].items()))
    header = [f"# Sweep {name}: leaderboard", "",
              (f"{summary['num_trials']} trials ({counts}); ranked by `{metric}` ({mode}), the sweep's first metric; "
               f"trials without it last. Sampler: {summary['sampler']}; early stopping: {summary['early_stopping']}."),
              ("Running trials show their latest evaluation. `step` is reached/max; `stopped_early`: stopped by ASHA. "
               f"Sample counts (`*/n_*`) are in {LEADERBOARD_CSV} only."), ""]
    return "\n".join(header) + leaderboard_markdown(columns, rows, top, summary["metrics"])
