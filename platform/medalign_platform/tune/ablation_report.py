"""The results of a layer ablation: per-layer mean ± std over seeds, as a table, CSV, plot and TensorBoard.

:func:`summarize_ablation` reads an ablation's folder (finished, running or interrupted)
and writes ``EXP_DIR/ablation/``: ``ablation.csv``, ``ablation.md``, ``ablation.json``,
``ablation.png`` and ``tensorboard/`` (the plot as an image, the table as text, per-layer
mean/std scalars at step = layer).
"""

from __future__ import annotations

import csv
import json
import logging
import re
import shutil
import statistics
import uuid
from collections.abc import Sequence
from pathlib import Path

from ..common.atomic import move_into_place, write_json_atomic, write_text_atomic
from ..common.errors import ConfigError
from .layout import SUMMARY_FILE, SWEEP_SPEC_FILE
from .records import finite_number, trial_records

logger = logging.getLogger(__name__)

ABLATION_DIR = "ablation"              # inside the experiment folder
SPEC_FILE = "spec.json"                # what was asked: layers, seeds, metric, mode
LAYER_KEY = "distill.layer"
SEED_KEY = "trainer.seed"
GROUNDING = "val/grounding"
OPEN_RECALL = "val/open_recall"


def _finished(record: dict) -> bool:
    """A trial that trained to the end: TERMINATED and (when its config says) at max_steps."""
    if record.get("status") != "TERMINATED":
        return False
    max_steps = (record.get("config") or {}).get("trainer", {}).get("max_steps")
    step = record.get("metrics", {}).get("step")
    return max_steps is None or step is None or int(step) >= int(max_steps)


def table_columns(metric: str, records: Sequence[dict]) -> list[str]:
    """The chosen metric, grounding and open recall, then their test/* twins present in any record."""
    val = list(dict.fromkeys([metric, GROUNDING, OPEN_RECALL]))
    tests = ["test/" + m.split("/", 1)[1] for m in val]
    present = {k for r in records for k in r.get("metrics", {})}
    return list(dict.fromkeys([*val, *(m for m in tests if m in present)]))


def describe(values: Sequence[float]) -> dict:
    """``mean``, sample ``std`` (ddof=1; 0.0 for a single value) and ``n``; None for no values."""
    if not values:
        return {"mean": None, "std": None, "n": 0}
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "n": len(values)}


def _average_ranks(values: Sequence[float]) -> list[float]:
    """Ranks 0..n-1, tied values sharing the mean of their ranks (as Spearman's rho needs)."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2
        start = end + 1
    return ranks


def correlation(xs: Sequence[float | None], ys: Sequence[float | None]) -> dict:
    """Pearson's r and Spearman's rho of the pairs where both values are numbers.

    Returns:
        ``pearson``, ``spearman`` (None with fewer than 3 pairs or a constant side) and ``n``.
    """
    pairs = [(float(x), float(y)) for x, y in zip(xs, ys, strict=True)
             if finite_number(x) is not None and finite_number(y) is not None]
    x, y = [p[0] for p in pairs], [p[1] for p in pairs]
    if len(pairs) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return {"pearson": None, "spearman": None, "n": len(pairs)}
    return {"pearson": statistics.correlation(x, y),
            "spearman": statistics.correlation(_average_ranks(x), _average_ranks(y)), "n": len(pairs)}


def grounding_reads(split: str, present: set[str]) -> list[str]:
    """The grounding measures of ``split`` among the ``present`` metric keys: the distillation
    layer's (``grounding_layer``, or its old name ``grounding``), the answer position's
    (``grounding_answer``, ``pointing_answer``) and its per-layer reads (``grounding_answer_l<k>``)."""
    layer = f"{split}/grounding_layer" if f"{split}/grounding_layer" in present else f"{split}/grounding"
    per_layer = sorted((k for k in present if re.fullmatch(rf"{re.escape(split)}/grounding_answer_l\d+", k)),
                       key=lambda k: int(k.rsplit("_l", 1)[1]))
    return [k for k in (layer, f"{split}/grounding_answer", f"{split}/pointing_answer", *per_layer) if k in present]


def grounding_vs_metric(finished: Sequence[dict], metric: str) -> list[dict]:
    """How each grounding measure correlates with the task metric across the finished trials.

    One block for the metric's split and, when the trials have it, one for the test twin:
    ``{"metric", "trials", "correlations": {grounding key: correlation(...)}}``. The trials
    differ in layer (and seed), so this mixes the layer's effect with the grounding's.
    """
    present = {k for record in finished for k in record.get("metrics", {})}
    blocks = []
    for target in dict.fromkeys([metric, "test/" + metric.split("/", 1)[1]]):
        if target not in present:
            continue
        values = [record["metrics"].get(target) for record in finished]
        correlations = {key: correlation([record["metrics"].get(key) for record in finished], values)
                        for key in grounding_reads(target.split("/", 1)[0], present)}
        blocks.append({"metric": target, "trials": len(finished), "correlations": correlations})
    return blocks


def _cells(records: Sequence[dict], layers: Sequence[int], seeds: Sequence[int]) -> tuple[dict, list[dict], int]:
    """``{(layer, seed): record}`` of finished trials (first by trial id), the missing cells, duplicates."""
    by_cell: dict[tuple, list[dict]] = {}
    for record in sorted(records, key=lambda r: str(r.get("trial_id"))):
        params = record.get("params", {})
        by_cell.setdefault((params.get(LAYER_KEY), params.get(SEED_KEY)), []).append(record)
    finished, missing, duplicates = {}, [], 0
    for layer in layers:
        for seed in seeds:
            group = by_cell.get((layer, seed), [])
            done = [r for r in group if _finished(r)]
            if done:
                finished[(layer, seed)] = done[0]
                duplicates += len(done) - 1
            else:
                status = ",".join(sorted({r.get("status", "?") for r in group})) or "NOT STARTED"
                missing.append({"layer": layer, "seed": seed, "status": status})
    return finished, missing, duplicates


def aggregate(records: Sequence[dict], layers: Sequence[int], seeds: Sequence[int],
              metric: str = "val/closed_accuracy", mode: str = "max") -> dict:
    """Per-layer statistics over seeds from sweep trial records.

    Args:
        records: :func:`~medalign_platform.tune.records.trial_records` rows (``status``,
            ``params`` with ``distill.layer``/``trainer.seed``, ``metrics``, ``trial_id``).
        layers, seeds: the grid; cells with no finished trial are listed in ``missing``.
        metric, mode: the metric that picks the best layer, and its direction.

    Returns:
        ``metric``, ``mode``, ``layers``, ``seeds``, ``columns``, ``rows`` (per layer:
        ``layer`` and ``stats[column] = {mean, std, n, values: [{seed, value, trial_id}]}``),
        ``best_layer`` (None if no layer has a value), ``cells`` (expected, finished,
        ``missing`` cells with their trial status, ``duplicates``), ``grounding_vs_metric``
        (:func:`grounding_vs_metric` over the finished cells).
    """
    finished, missing, duplicates = _cells(records, layers, seeds)
    columns = table_columns(metric, list(finished.values()))
    rows = []
    for layer in layers:
        stats = {}
        for column in columns:
            values = []
            for seed in seeds:
                record = finished.get((layer, seed))
                value = finite_number(record["metrics"].get(column)) if record else None
                value = None if value is None else float(value)
                if value is not None:
                    values.append({"seed": seed, "value": value, "trial_id": record.get("trial_id")})
            stats[column] = {**describe([v["value"] for v in values]), "values": values}
        rows.append({"layer": layer, "stats": stats})
    return {
        "metric": metric, "mode": mode, "layers": list(layers), "seeds": list(seeds), "columns": columns,
        "rows": rows, "best_layer": best_layer(rows, metric, mode),
        "cells": {"expected": len(layers) * len(seeds), "finished": len(finished), "missing": missing,
                  "duplicates": duplicates},
        "grounding_vs_metric": grounding_vs_metric(list(finished.values()), metric),
    }


def best_layer(rows: Sequence[dict], metric: str, mode: str = "max") -> int | None:
    """The layer with the best mean ``metric`` (ties: the first listed); None if none has a value."""
    scored = [(row["stats"][metric]["mean"], row["layer"]) for row in rows if row["stats"][metric]["n"]]
    if not scored:
        return None
    pick = max if mode == "max" else min
    best = pick(value for value, _ in scored)
    return next(layer for value, layer in scored if value == best)


# --------------------------------------------------------------------------- outputs


def cell_text(stat: dict) -> str:
    if not stat["n"]:
        return "– (0)"
    return f"{stat['mean']:.4f} ± {stat['std']:.4f} ({stat['n']})"


def markdown_table(result: dict) -> str:
    """``| layer | metric | ... |`` with ``mean ± std (n)`` cells, the best layer in bold, and notes."""
    columns = result["columns"]
    lines = ["| layer | " + " | ".join(columns) + " |", "| ---: |" + " ---: |" * len(columns)]
    for row in result["rows"]:
        best = row["layer"] == result["best_layer"]
        label = f"**{row['layer']}** (best)" if best else str(row["layer"])
        lines.append(f"| {label} | " + " | ".join(cell_text(row["stats"][c]) for c in columns) + " |")
    cells = result["cells"]
    notes = [
        "",
        (f"mean ± sample std (ddof=1) over trainer.seed {result['seeds']}; (n) = seeds with a value. "
         f"Best layer by {result['mode']} mean {result['metric']} (ties: the first listed): {result['best_layer']}."),
    ]
    single = [row["layer"] for row in result["rows"] if row["stats"][result["metric"]]["n"] == 1]
    if single:
        notes.append(f"n=1 (layers {single}): one seed, so std is 0 and says nothing about spread.")
    notes.append(f"Cells finished: {cells['finished']}/{cells['expected']}.")
    if cells["missing"]:
        missing = ", ".join(f"layer {m['layer']} seed {m['seed']} ({m['status']})" for m in cells["missing"])
        notes.append(f"Incomplete: {missing}.")
    for block in result.get("grounding_vs_metric", []):
        reads = [f"{key} {_rho(c['pearson'])} / {_rho(c['spearman'])}" for key, c in block["correlations"].items()]
        if reads:
            notes.append(f"Grounding vs {block['metric']} across the {block['trials']} finished trials (Pearson / "
                         f"Spearman; the trials differ in layer too): " + ", ".join(reads) + ".")
    return "\n".join(lines + notes) + "\n"


def _rho(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.2f}"


def write_csv(result: dict, path: Path) -> Path:
    """One row per layer: ``layer`` then ``<column>_mean``, ``_std``, ``_n`` (empty when n=0)."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["layer", *(f"{c}_{s}" for c in result["columns"] for s in ("mean", "std", "n"))])
        for row in result["rows"]:
            cells = []
            for column in result["columns"]:
                stat = row["stats"][column]
                cells += ["" if stat["mean"] is None else repr(stat["mean"]),
                          "" if stat["std"] is None else repr(stat["std"]), stat["n"]]
            writer.writerow([row["layer"], *cells])
    return path


def _panel(axes, result: dict, column: str, title: str) -> None:
    """Mean ± std per layer, each seed as a faint point, the best layer marked."""
    rows = [row for row in result["rows"] if row["stats"][column]["n"]]
    axes.set_title(title)
    axes.set_xlabel("distillation layer L")
    axes.set_xticks(result["layers"])
    axes.set_xlim(min(result["layers"]) - 0.5, max(result["layers"]) + 0.5)  # keeps end markers off the frame
    axes.grid(alpha=0.3)
    if not rows:
        axes.text(0.5, 0.5, f"no finished values of {column}", ha="center", va="center", transform=axes.transAxes)
        return
    spread = 0.06 * (max(result["layers"]) - min(result["layers"]) or 1)
    seeds = result["seeds"]
    for row in rows:
        for item in row["stats"][column]["values"]:  # jittered by seed so repeated values stay visible
            offset = spread * (seeds.index(item["seed"]) - (len(seeds) - 1) / 2) / max(len(seeds), 1)
            axes.plot(row["layer"] + offset, item["value"], "o", color="tab:blue", alpha=0.3, markersize=4)
    layers = [row["layer"] for row in rows]
    means = [row["stats"][column]["mean"] for row in rows]
    stds = [row["stats"][column]["std"] for row in rows]
    axes.errorbar(layers, means, yerr=stds, fmt="o-", color="tab:blue", capsize=4, label="mean ± std")
    best = result["best_layer"]
    if best is not None:
        axes.axvline(best, color="tab:orange", linestyle=":", label=f"best layer ({best})")
        if best in layers:
            axes.plot(best, means[layers.index(best)], "*", color="tab:orange", markersize=16, zorder=5)


def plot_ablation(result: dict, path: Path) -> Path:
    """Two panels, metric vs layer and grounding vs layer, written as a PNG (Agg, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4), dpi=110)
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    _panel(left, result, result["metric"], f"{result['metric']} ({result['mode']})")
    _panel(right, result, GROUNDING, f"grounding score ({GROUNDING})")
    right.axhline(1.0, color="gray", linestyle="--", linewidth=1, label="chance (1.0)")
    for axes in (left, right):
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=8, loc="best")
    figure.suptitle(f"Layer ablation: mean ± std over seeds {result['seeds']} "
                    f"({result['cells']['finished']}/{result['cells']['expected']} cells)")
    figure.tight_layout()
    figure.savefig(path)
    return path


def log_tensorboard(result: dict, png: Path, markdown: str, log_dir: Path) -> Path:
    """The plot (image), the table (Markdown text) and per-layer mean/std scalars (step = layer).

    The folder is rebuilt from scratch each time, so a re-summarized ablation shows one
    value per layer, not one per summary. It is built beside the old one and swapped in
    (:func:`~medalign_platform.common.atomic.move_into_place`): a running TensorBoard, or a
    build that fails half-way, never sees a half-written or missing folder.
    """
    import numpy as np
    from PIL import Image
    from torch.utils.tensorboard import SummaryWriter

    log_dir = Path(log_dir)
    building = log_dir.parent / f".{log_dir.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        writer = SummaryWriter(str(building))
        try:
            with Image.open(png) as image:
                writer.add_image("ablation/plot", np.asarray(image.convert("RGB")), 0, dataformats="HWC")
            writer.add_text("ablation/table", markdown, 0)
            for row in result["rows"]:
                for column, stat in row["stats"].items():
                    if stat["n"]:
                        writer.add_scalar(f"ablation/{column}/mean", stat["mean"], row["layer"])
                        writer.add_scalar(f"ablation/{column}/std", stat["std"], row["layer"])
            writer.flush()
        finally:
            writer.close()
        move_into_place(building, log_dir)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return log_dir


def write_outputs(result: dict, out_dir: Path) -> dict:
    """Writes ``ablation.{csv,md,png,json}`` and ``tensorboard/`` into ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown = markdown_table(result)
    files = {"csv": str(write_csv(result, out_dir / "ablation.csv")),
             "markdown": str(out_dir / "ablation.md"),
             "png": str(plot_ablation(result, out_dir / "ablation.png")),
             "json": str(out_dir / "ablation.json"),
             "tensorboard": str(out_dir / "tensorboard")}
    write_text_atomic(out_dir / "ablation.md", markdown)
    log_tensorboard(result, out_dir / "ablation.png", markdown, out_dir / "tensorboard")
    write_json_atomic(out_dir / "ablation.json", {**result, "files": files})
    return files


# --------------------------------------------------------------------------- summary of a folder


def _spec(experiment_dir: Path) -> dict:
    """The ablation's layers, seeds, metric and mode: its spec.json, else the sweep's records."""
    path = experiment_dir / ABLATION_DIR / SPEC_FILE
    if path.is_file():
        return json.loads(path.read_text())
    sweep_path = experiment_dir / SWEEP_SPEC_FILE
    if not sweep_path.is_file():
        raise ConfigError(f"{experiment_dir} has no {ABLATION_DIR}/{SPEC_FILE} or {SWEEP_SPEC_FILE}: not an "
                          f"ablation folder (written by medalign ablate-layers)")
    sweep = json.loads(sweep_path.read_text())
    space = sweep["search_space"]
    if LAYER_KEY not in space or SEED_KEY not in space or "values" not in space[LAYER_KEY]:
        raise ConfigError(f"{experiment_dir}: its search space is not a {LAYER_KEY} x {SEED_KEY} grid")
    return {"layers": space[LAYER_KEY]["values"], "seeds": space[SEED_KEY]["values"],
            "metric": sweep["settings"]["metrics"][0], "mode": sweep["settings"]["modes"][0]}


def _records(experiment_dir: Path) -> list[dict]:
    """The trials' records, live from Tune's state (a running or interrupted ablation shows its
    progress); else the ones ``summary.json`` kept; else none (killed before Tune saved anything)."""
    try:
        return trial_records(experiment_dir)
    except Exception as error:  # noqa: BLE001 - no Tune state yet, or unreadable: fall back, never crash
        logger.info("cannot read Tune's trial records in %s (%s)", experiment_dir, error)
    summary = experiment_dir / SUMMARY_FILE
    if summary.is_file():
        return json.loads(summary.read_text()).get("records", [])
    logger.warning("no trial records in %s yet (no Tune state, no %s)", experiment_dir, SUMMARY_FILE)
    return []


def summarize_ablation(experiment_dir: str | Path) -> dict:
    """Aggregates an ablation folder (finished, running or interrupted) and rewrites its outputs.

    Cells without a finished trial are listed under ``cells.missing`` and lower ``n``.

    Returns:
        :func:`aggregate`'s result plus ``experiment_dir``, ``markdown`` and ``files``.

    Raises:
        ConfigError: the folder is not an ablation (or sweep) experiment.
    """
    experiment_dir = Path(experiment_dir).expanduser().resolve()
    spec = _spec(experiment_dir)
    records = _records(experiment_dir)
    result = aggregate(records, spec["layers"], spec["seeds"], spec["metric"], spec["mode"])
    result["experiment_dir"] = str(experiment_dir)
    files = write_outputs(result, experiment_dir / ABLATION_DIR)
    result["markdown"] = markdown_table(result)
    result["files"] = files
    return result


