"""``medalign ablate-layers``: the same trial over distillation layers x seeds, everything else fixed.

``ablate_command(["experiment=synthmed_vqa", "layers=[1,2,3]", "seeds=[0,1,2]"])``

The ablation *is* a sweep: a grid search space ``distill.layer x trainer.seed`` is written
to ``EXP_DIR/ablation/layers_seeds.yaml`` and :func:`~medalign_platform.tune.sweep.run_sweep`
runs it with the grid sampler, ASHA off (every cell trains to ``trainer.max_steps``) and
``num_samples`` = the grid size. Resume (``resume=true``), per-trial TensorBoard, the
SQLite study and ``medalign status`` therefore work exactly as for ``medalign sweep``.

Overrides:

* ``layers=[1,2,3]`` (required): distillation layers, checked against the model depth
  before Ray starts (the sweep's own search-space check, so the same error).
* ``seeds=[0,1,2]`` (default): values of ``trainer.seed``.
* ``ablation.metric`` (default ``val/closed_accuracy``; ``test/...`` needs
  ``trainer.test_size>0``), ``ablation.mode`` (max|min: which layer is best),
  ``ablation.name``, ``ablation.output_dir`` (default ``sweeps``),
  ``ablation.max_concurrent``, ``ablation.executor`` (auto|train|inline), ``resume=true``.
* ``sweep.{trial_resources,num_workers,verbose,seed,resume_errored,restart_errored}``
  pass through to the sweep; everything else is a run-config override.

After the sweep, :func:`summarize_ablation` aggregates the trial records per layer (mean,
sample std with ddof=1, n) and writes ``EXP_DIR/ablation/``: ``ablation.csv``,
``ablation.md``, ``ablation.json``, ``ablation.png`` and ``tensorboard/`` (the plot as an
image, the table as text, per-layer mean/std scalars at step = layer).
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..common.atomic import write_text_atomic
from ..run.compose import ConfigError
from .results import finite_number

logger = logging.getLogger(__name__)

ABLATION_DIR = "ablation"              # inside the experiment folder
GRID_FILE = "layers_seeds.yaml"        # the generated search space
SPEC_FILE = "spec.json"                # what was asked: layers, seeds, metric, mode
LAYER_KEY = "distill.layer"
SEED_KEY = "trainer.seed"
GROUNDING = "val/grounding"
OPEN_RECALL = "val/open_recall"
DEFAULT_SEEDS = [0, 1, 2]
ABLATION_DEFAULTS: dict = {
    "metric": "val/closed_accuracy",
    "mode": "max",
    "name": None,                      # default: <run.name>-ablate-layers
    "output_dir": "sweeps",
    "max_concurrent": None,            # default: the sweep's
    "executor": None,                  # auto | train | inline (default: the sweep's)
}
# sweep.* keys a user may still pass; the others are what makes this an ablation.
SWEEP_PASSTHROUGH = ("trial_resources", "num_workers", "verbose", "seed", "resume_errored", "restart_errored")


# --------------------------------------------------------------------------- arguments


@dataclass
class AblationRequest:
    """The parsed ``medalign ablate-layers`` overrides (syntax and types checked, no config yet).

    ``None`` means "not given": defaults are filled in by :func:`plan_ablation`, which on
    ``resume=true`` prefers what the ablation recorded.
    """

    layers: list[int] | None = None
    seeds: list[int] | None = None
    options: dict = field(default_factory=dict)      # given ablation.* values
    resume: bool = False
    sweep_overrides: list[str] = field(default_factory=list)
    config_overrides: list[str] = field(default_factory=list)


def _int_list(key: str, value: Any) -> list[int]:
    """``value`` as a non-empty list of distinct integers (a bare integer is a list of one)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    example = f"{key}=[1,2,3]" if key == "layers" else f"{key}=[0,1,2]"
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{key} must be a non-empty list of integers like {example}, got {value!r}")
    bad = [v for v in value if isinstance(v, bool) or not isinstance(v, int)]
    if bad:
        raise ConfigError(f"{key} must hold integers only, like {example}; not integers: {bad}")
    if len(set(value)) != len(value):
        raise ConfigError(f"{key}={value} repeats a value; list each once")
    return list(value)


def _parse_one(parser, text: str) -> Any:
    from hydra.errors import HydraException

    try:
        (parsed,) = parser.parse_overrides([text.lstrip("+~")])
    except HydraException as error:
        raise ConfigError(f"cannot parse override {text!r}: {error}") from error
    return parsed.value()


def _check_sweep_key(text: str, key: str) -> None:
    """Only :data:`SWEEP_PASSTHROUGH` keys; the rest are fixed by the ablation or have an ``ablation.*`` twin."""
    name = key.split(".")[1] if "." in key else key
    if key == "search":
        raise ConfigError("ablate-layers writes its own search space (layers x seeds); drop search=")
    if name in SWEEP_PASSTHROUGH:
        return
    twin = {"metric": "ablation.metric", "metrics": "ablation.metric", "mode": "ablation.mode",
            "modes": "ablation.mode", "name": "ablation.name", "output_dir": "ablation.output_dir",
            "max_concurrent": "ablation.max_concurrent", "executor": "ablation.executor", "resume": "resume=true"}
    if name in twin:
        raise ConfigError(f"{text!r}: use {twin[name]} with ablate-layers")
    raise ConfigError(f"{text!r}: ablate-layers fixes the sampler (grid), num_samples (the grid size) and "
                      f"turns ASHA off; sweep keys it passes on: {list(SWEEP_PASSTHROUGH)}")


def parse_ablation_args(overrides: Sequence[str]) -> AblationRequest:
    """Splits ``layers=``/``seeds=``/``ablation.*``/``resume=``/``sweep.*`` from run-config overrides.

    Raises:
        ConfigError: a malformed value, an unknown ``ablation.*`` key, or a key the
            ablation sets itself (``distill.layer``, ``trainer.seed``, ``search``, ...).
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    request = AblationRequest()
    for text in overrides:
        key = text.split("=", 1)[0].lstrip("+~")
        if key in (LAYER_KEY, SEED_KEY):
            flag = "layers" if key == LAYER_KEY else "seeds"
            raise ConfigError(f"{text!r}: ablate-layers sets {key} per trial; pass {flag}=[...] instead")
        if key == "layers":
            request.layers = _int_list("layers", _parse_one(parser, text))
        elif key == "seeds":
            request.seeds = _int_list("seeds", _parse_one(parser, text))
        elif key == "resume":
            value = _parse_one(parser, text)
            if not isinstance(value, bool):
                raise ConfigError(f"resume must be true or false, got {value!r}")
            request.resume = value
        elif key.startswith("ablation."):
            name = key.split(".", 1)[1]
            if name not in ABLATION_DEFAULTS:
                raise ConfigError(f"unknown setting {key}; valid: {['ablation.' + k for k in ABLATION_DEFAULTS]}")
            request.options[name] = _parse_one(parser, text)
        elif key == "search" or key.startswith("sweep."):
            _check_sweep_key(text, key)
            request.sweep_overrides.append(text)
        else:
            request.config_overrides.append(text)
    return request


# --------------------------------------------------------------------------- the plan


@dataclass
class AblationPlan:
    """Everything :func:`run_ablation` needs, validated against the config and the model."""

    experiment_dir: Path
    layers: list[int]
    seeds: list[int]
    metric: str
    mode: str
    sweep_overrides: list[str]

    @property
    def ablation_dir(self) -> Path:
        return self.experiment_dir / ABLATION_DIR

    @property
    def grid_path(self) -> Path:
        return self.ablation_dir / GRID_FILE

    def spec(self) -> dict:
        return {"layers": self.layers, "seeds": self.seeds, "metric": self.metric, "mode": self.mode,
                "grid_file": str(self.grid_path)}


def grid_space_data(layers: Sequence[int], seeds: Sequence[int]) -> dict:
    """The search-space YAML content of the ablation grid (``distill.layer x trainer.seed``)."""
    return {
        "description": f"layer ablation: distill.layer {list(layers)} x trainer.seed {list(seeds)}",
        LAYER_KEY: {"type": "grid", "values": list(layers)},
        SEED_KEY: {"type": "grid", "values": list(seeds)},
    }


def write_grid_file(path: Path, layers: Sequence[int], seeds: Sequence[int]) -> Path:
    """Writes the grid search space where ``search=<path>`` loads it."""
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# Written by medalign ablate-layers; the sweep records it in sweep.json.\n"
                    + yaml.safe_dump(grid_space_data(layers, seeds), sort_keys=False))
    return path


def _quote(value: str) -> str:
    """A Hydra single-quoted string, so paths with ``=``, ``:`` or spaces survive the override parser."""
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _metric_options(options: dict, base_config: dict) -> tuple[str, str]:
    metric, mode = options["metric"], options["mode"]
    if not isinstance(metric, str) or not metric.startswith(("val/", "test/")) or metric.count("/") != 1:
        raise ConfigError(f"ablation.metric={metric!r} must be an evaluation metric like val/closed_accuracy, "
                          f"val/grounding or test/closed_accuracy")
    if metric.startswith("test/") and not int(base_config["trainer"].get("test_size") or 0) > 0:
        raise ConfigError(f"ablation.metric={metric}: test metrics need trainer.test_size>0 (the test split is "
                          f"evaluated once, at the end of each trial)")
    if mode not in ("max", "min"):
        raise ConfigError(f"ablation.mode must be max or min, got {mode!r}")
    return metric, mode


def _recorded_grid(ablation_dir: Path, request: AblationRequest) -> tuple[list[int] | None, list[int] | None, dict]:
    """On ``resume=true``: the layers, seeds and options the ablation started with (else what was given)."""
    spec_path = ablation_dir / SPEC_FILE
    if not (request.resume and spec_path.is_file()):
        return request.layers, request.seeds, {}
    recorded = json.loads(spec_path.read_text())
    for key, given in (("layers", request.layers), ("seeds", request.seeds)):
        if given is not None and given != recorded[key]:
            raise ConfigError(f"resume: {ablation_dir.parent} ran {key}={recorded[key]}; drop {key}= to continue "
                              f"it, or pass ablation.name=... for a new ablation with {key}={given}")
    return recorded["layers"], recorded["seeds"], {k: recorded[k] for k in ("metric", "mode")}


def plan_ablation(request: AblationRequest) -> AblationPlan:
    """Composes and validates the run config and the grid; nothing is written, Ray is not started.

    Raises:
        ConfigError / SearchSpaceError: a bad config, a layer outside ``1..depth-1`` (the
            sweep's own search-space error), a bad metric, or an existing ablation without
            ``resume=true``.
    """
    from ..run.compose import compose_config, model_depth, validate_run_config
    from .search_space import parse_search_space
    from .sweep import SWEEP_SPEC_FILE, split_overrides, sweep_settings

    base_config = compose_config(request.config_overrides)
    validate_run_config(base_config)
    options = {**ABLATION_DEFAULTS, **request.options}
    name = options["name"] or f"{base_config['run'].get('name') or 'ablation'}-ablate-layers"
    if not isinstance(name, str) or "/" in name or name in ("", ".", ".."):
        raise ConfigError(f"ablation.name={name!r} must be a plain folder name")
    experiment_dir = Path(str(options["output_dir"])).expanduser().resolve() / name
    if (experiment_dir / SWEEP_SPEC_FILE).is_file() and not request.resume:
        raise ConfigError(f"{experiment_dir} already holds an ablation: pass resume=true to continue it, or a new "
                          f"ablation.name")
    layers, seeds, recorded = _recorded_grid(experiment_dir / ABLATION_DIR, request)
    if layers is None:
        raise ConfigError("ablate-layers needs layers=[...], the distillation layers to compare, e.g. layers=[1,2,3]")
    seeds = list(DEFAULT_SEEDS) if seeds is None else seeds
    metric, mode = _metric_options({**options, **{k: v for k, v in recorded.items() if k not in request.options}},
                                   base_config)

    # The sweep's own check, on the same space: a layer outside the model fails here, with its message.
    grid_path = experiment_dir / ABLATION_DIR / GRID_FILE
    space = parse_search_space(grid_space_data(layers, seeds), source=str(grid_path), name=grid_path.stem)
    space.validate(base_config, depth=model_depth(str(base_config["model"]["path"])))

    plan = AblationPlan(experiment_dir, layers, seeds, metric, mode, [])
    plan.sweep_overrides = _sweep_overrides(plan, request, options)
    # The sweep's own settings check (executor, concurrency, resources, ...), before anything is written.
    parsed, rest = split_overrides(plan.sweep_overrides)
    sweep_settings(parsed, base_config, space, rest)
    return plan


def _sweep_overrides(plan: AblationPlan, request: AblationRequest, options: dict) -> list[str]:
    # Tune needs the sweep metric in every evaluation report, and test/* only comes with the
    # last one: a test metric drives the sweep through its val twin (the grid ignores it anyway).
    sweep_metric = "val/" + plan.metric.split("/", 1)[1]
    out = [*request.config_overrides, f"search={_quote(plan.grid_path)}",
           f"sweep.name={_quote(plan.experiment_dir.name)}", f"sweep.output_dir={_quote(plan.experiment_dir.parent)}",
           "sweep.sampler=grid", f"sweep.num_samples={len(plan.layers) * len(plan.seeds)}",
           "sweep.asha.enabled=false", f"sweep.metric={sweep_metric}", f"sweep.mode={plan.mode}"]
    for key in ("max_concurrent", "executor"):
        if options[key] is not None:
            out.append(f"sweep.{key}={options[key]}")
    out.extend(request.sweep_overrides)
    if request.resume:
        out.append("resume=true")
    return out


# --------------------------------------------------------------------------- running


def run_ablation(overrides: Sequence[str]) -> dict:
    """Runs (or with ``resume=true`` continues) a layer x seed ablation and summarizes it.

    Args:
        overrides: ``layers=[...]``, ``seeds=[...]``, ``ablation.*``, ``resume=true``,
            pass-through ``sweep.*`` and run-config overrides.

    Returns:
        :func:`summarize_ablation`'s result plus ``sweep`` (what ``run_sweep`` returned).

    Raises:
        ConfigError / SearchSpaceError: bad input, before Ray starts.
    """
    from .sweep import run_sweep

    plan = plan_ablation(parse_ablation_args(overrides))
    write_grid_file(plan.grid_path, plan.layers, plan.seeds)
    _write_json(plan.ablation_dir / SPEC_FILE, plan.spec())
    sweep = run_sweep(plan.sweep_overrides)
    result = summarize_ablation(plan.experiment_dir)
    result["sweep"] = sweep
    return result


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True, default=str))


# --------------------------------------------------------------------------- aggregation


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
        records: :func:`~medalign_platform.tune.sweep.trial_records` rows (``status``,
            ``params`` with ``distill.layer``/``trainer.seed``, ``metrics``, ``trial_id``).
        layers, seeds: the grid; cells with no finished trial are listed in ``missing``.
        metric, mode: the metric that picks the best layer, and its direction.

    Returns:
        ``metric``, ``mode``, ``layers``, ``seeds``, ``columns``, ``rows`` (per layer:
        ``layer`` and ``stats[column] = {mean, std, n, values: [{seed, value, trial_id}]}``),
        ``best_layer`` (None if no layer has a value), ``cells`` (expected, finished,
        ``missing`` cells with their trial status, ``duplicates``).
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


def _cell_text(stat: dict) -> str:
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
        lines.append(f"| {label} | " + " | ".join(_cell_text(row["stats"][c]) for c in columns) + " |")
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
    return "\n".join(lines + notes) + "\n"


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
    value per layer, not one per summary.
    """
    import numpy as np
    from PIL import Image
    from torch.utils.tensorboard import SummaryWriter

    shutil.rmtree(log_dir, ignore_errors=True)
    writer = SummaryWriter(str(log_dir))
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
    _write_json(out_dir / "ablation.json", {**result, "files": files})
    return files


# --------------------------------------------------------------------------- summary of a folder


def _spec(experiment_dir: Path) -> dict:
    """The ablation's layers, seeds, metric and mode: its spec.json, else the sweep's records."""
    path = experiment_dir / ABLATION_DIR / SPEC_FILE
    if path.is_file():
        return json.loads(path.read_text())
    from .sweep import SWEEP_SPEC_FILE

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
    from .sweep import SUMMARY_FILE, trial_records

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


# --------------------------------------------------------------------------- command line


def ablate_command(overrides: Sequence[str]) -> int:
    """``medalign ablate-layers ...``: runs the ablation and prints the table and where it went.

    Returns:
        0, or 2 with the message on stderr for bad input.
    """
    try:
        result = run_ablation(overrides)
    except ConfigError as error:
        print(f"medalign ablate-layers: {error}", file=sys.stderr)
        return 2
    print(result["markdown"])
    best = result["best_layer"]
    if best is not None:
        stat = next(r for r in result["rows"] if r["layer"] == best)["stats"][result["metric"]]
        print(f"best layer: {best} ({result['metric']} {_cell_text(stat)})")
    else:
        print(f"best layer: none yet (no finished trial reported {result['metric']})")
    print("files:")
    for kind, path in result["files"].items():
        print(f"  {kind:12s}{path}")
    print(f"tensorboard --logdir {result['files']['tensorboard']}   "
          f"(per trial: tensorboard --logdir {result['experiment_dir']})")
    return 0
