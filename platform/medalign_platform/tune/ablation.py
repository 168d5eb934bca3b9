"""``medalign ablate-layers``: the same trial over distillation layers x seeds, everything else fixed.

``ablate_command(["experiment=synthmed_vqa", "layers=[1,2,3]", "seeds=[0,1,2]"])``

The ablation *is* a sweep: it hands :func:`~medalign_platform.tune.driver.run_sweep` a
:class:`~medalign_platform.tune.settings.SweepRequest` whose search space is the grid
``distill.layer x trainer.seed`` (recorded in ``EXP_DIR/ablation/layers_seeds.yaml``), with
the grid sampler, ASHA off (every cell trains to ``trainer.max_steps``) and ``num_samples``
= the grid size. The request is checked once, by the sweep's own preparation, so a layer
outside the model fails with the same message as in a sweep. Resume (``resume=true``),
per-trial TensorBoard, the SQLite study and ``medalign status`` work exactly as for a sweep.

Overrides:

* ``layers=[1,2,3]`` (required) and ``seeds=[0,1,2]`` (default): the grid.
* ``ablation.*`` (:class:`AblationOptions`): the metric and mode that pick the best layer,
  the folder (``name``, ``output_dir``), ``max_concurrent`` and ``executor``.
* ``sweep.{trial_resources,num_workers,verbose,seed,resume_errored,restart_errored,reuse_actors}``
  pass through to the sweep (the other sweep keys are what makes this an ablation); ``resume=true``.
* Everything else is a run-config override.

After the sweep, :func:`~medalign_platform.tune.ablation_report.summarize_ablation` writes
the per-layer table, CSV, plot and TensorBoard into ``EXP_DIR/ablation/``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from ..common.atomic import write_json_atomic
from ..common.errors import ConfigError
from ..common.overrides import as_tree, parse_overrides, split_overrides, texts
from ..common.settings import Settings, setting
from ..run.filesystems import is_uri
from .ablation_report import ABLATION_DIR, LAYER_KEY, SEED_KEY, SPEC_FILE, cell_text, summarize_ablation
from .layout import SWEEP_SPEC_FILE
from .outcome import sweep_outcome
from .settings import SweepOptions, SweepRequest

GRID_FILE = "layers_seeds.yaml"        # the grid search space, as the sweep records it
DEFAULT_SEEDS = [0, 1, 2]
# sweep.* keys a user may still pass; the others are what makes this an ablation.
# reuse_actors is allowed here, unlike in an ASHA sweep: the grid never stops a trial early.
SWEEP_PASSTHROUGH = ("trial_resources", "num_workers", "verbose", "seed", "resume_errored", "restart_errored",
                     "reuse_actors")


@dataclass
class AblationOptions(Settings):
    """The ``ablation.*`` keys of ``medalign ablate-layers``."""

    section: ClassVar[str] = "ablation"

    metric: str = setting("val/closed_accuracy", "The metric that picks the best layer (test/* needs "
                                                 "trainer.test_size > 0).")
    mode: Literal["max", "min"] = setting("max", "Direction of metric.")
    name: str | None = setting(None, "Experiment folder name (default: <run.name>-ablate-layers).")
    output_dir: str = setting("sweeps", "The folder name lives in.")
    max_concurrent: int | None = setting(None, "Trials at once (default: the sweep's).", ge=1)
    executor: Literal["auto", "train", "inline"] | None = setting(None, "auto | train | inline (default: the sweep's).")
    allow_test_selection: bool = setting(False, "Allow ablation.metric on test/* (picking the best layer on the test "
                                                "split makes its score an optimistic estimate).")

    def check(self) -> None:
        metric = self.metric
        if not metric.startswith(("val/", "test/")) or metric.count("/") != 1:
            self.fail("metric", f"={metric!r} must be an evaluation metric like val/closed_accuracy, val/grounding "
                                f"or test/closed_accuracy")
        if self.name is not None and ("/" in self.name or self.name in ("", ".", "..")):
            self.fail("name", f"must be a plain folder name (no '/', '.' or '..'), got {self.name!r}")


@dataclass
class AblationRequest:
    """The parsed ``medalign ablate-layers`` overrides (syntax and types checked, no config yet).

    ``None`` means "not given": defaults are filled in by :func:`plan_ablation`, which on
    ``resume=true`` prefers what the ablation recorded.
    """

    layers: list[int] | None = None
    seeds: list[int] | None = None
    options: dict = field(default_factory=dict)      # given ablation.* values (typed by AblationOptions)
    resume: bool = False
    sweep_options: dict = field(default_factory=dict)  # given pass-through sweep.* values
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


def parse_ablation_args(overrides: Sequence[str]) -> AblationRequest:
    """Splits ``layers=``/``seeds=``/``ablation.*``/``resume=``/``sweep.*`` from run-config overrides.

    Raises:
        ConfigError: a malformed value, an unknown ``ablation.*`` key, or a key the
            ablation sets itself (``distill.layer``, ``trainer.seed``, ``search``, sweep keys).
    """
    parsed = parse_overrides(overrides)
    ours, rest = split_overrides(parsed, lambda key: key in ("layers", "seeds", "resume", "search", LAYER_KEY, SEED_KEY)
                                 or key.startswith(("ablation.", "sweep.")))
    request = AblationRequest(config_overrides=texts(rest))
    for override in ours:
        key = override.key
        if key in (LAYER_KEY, SEED_KEY):
            flag = "layers" if key == LAYER_KEY else "seeds"
            raise ConfigError(f"{override.text!r}: ablate-layers sets {key} per trial; pass {flag}=[...] instead")
        if key == "search":
            raise ConfigError("ablate-layers writes its own search space (layers x seeds); drop search=")
        if key.startswith("sweep.") and key.split(".")[1] not in SWEEP_PASSTHROUGH:
            raise ConfigError(f"{override.text!r}: ablate-layers sets this itself (grid sampler, the grid size, no "
                              f"ASHA; name, output_dir, metric, mode, max_concurrent and executor are ablation.* "
                              f"keys); sweep keys it passes on: {list(SWEEP_PASSTHROUGH)}")
    values = {o.key: o.value for o in ours}
    if "layers" in values:
        request.layers = _int_list("layers", values["layers"])
    if "seeds" in values:
        request.seeds = _int_list("seeds", values["seeds"])
    if "resume" in values:
        if not isinstance(values["resume"], bool):
            raise ConfigError(f"resume must be true or false, got {values['resume']!r}")
        request.resume = values["resume"]
    request.options = as_tree([o for o in ours if o.key.startswith("ablation.")], strip="ablation.")
    AblationOptions.from_dict(request.options)  # types and names checked now, before any config is composed
    request.sweep_options = as_tree([o for o in ours if o.key.startswith("sweep.")], strip="sweep.")
    SweepOptions.from_dict(request.sweep_options)
    return request


# --------------------------------------------------------------------------- the plan


@dataclass
class AblationPlan:
    """Everything :func:`run_ablation` needs, checked against the config and the model."""

    experiment_dir: Path
    layers: list[int]
    seeds: list[int]
    metric: str
    mode: str
    sweep: SweepRequest
    prepared: tuple  # :func:`~medalign_platform.tune.driver.prepare_sweep`'s (plan, space, base)

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
    """Writes the grid search space (a file ``search=<path>`` loads too)."""
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# Written by medalign ablate-layers; the sweep records it in sweep.json.\n"
                    + yaml.safe_dump(grid_space_data(layers, seeds), sort_keys=False))
    return path


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
    """Composes and checks the run config, the grid and the sweep, once; nothing is written, Ray is not started.

    Raises:
        ConfigError / SearchSpaceError: a bad config, a layer outside ``1..depth-1`` (the
            sweep's own search-space error), a bad metric, or an existing ablation without
            ``resume=true``.
    """
    from ..run.driver import resolve_run_settings
    from .driver import prepare_sweep
    from .search_space import parse_search_space

    given = AblationOptions.from_dict(request.options)
    if is_uri(given.output_dir):  # its grid file and report are local files for now
        raise ConfigError(f"ablation.output_dir={given.output_dir}: medalign ablate-layers needs a local folder (on a "
                          f"multi-node cluster, a shared filesystem such as NFS); object-store URIs work for "
                          f"medalign sweep and train")
    base = resolve_run_settings(request.config_overrides, default_name="ablation")
    name = given.name or f"{base.run.name}-ablate-layers"
    experiment_dir = Path(given.output_dir).expanduser().resolve() / name
    if (experiment_dir / SWEEP_SPEC_FILE).is_file() and not request.resume:
        raise ConfigError(f"{experiment_dir} already holds an ablation: pass resume=true to continue it, or a new "
                          f"ablation.name")
    layers, seeds, recorded = _recorded_grid(experiment_dir / ABLATION_DIR, request)
    if layers is None:
        raise ConfigError("ablate-layers needs layers=[...], the distillation layers to compare, e.g. layers=[1,2,3]")
    seeds = list(DEFAULT_SEEDS) if seeds is None else seeds
    options = AblationOptions.from_dict({**recorded, **request.options})
    if options.metric.startswith("test/") and not options.allow_test_selection:
        raise ConfigError(f"ablation.metric={options.metric} picks the best layer on the test split, which makes its "
                          f"test score an optimistic estimate; use val/{options.metric.split('/', 1)[1]}, or pass "
                          f"ablation.allow_test_selection=true to do it anyway")
    if options.metric.startswith("test/") and not base.trainer.test_size > 0:
        raise ConfigError(f"ablation.metric={options.metric}: test metrics need trainer.test_size>0 (the test split "
                          f"is evaluated once, at the end of each trial)")

    grid_path = experiment_dir / ABLATION_DIR / GRID_FILE
    space = parse_search_space(grid_space_data(layers, seeds), source=str(grid_path), name=grid_path.stem)
    # Tune needs the sweep metric in every evaluation report, and test/* only comes with the
    # last one: a test metric drives the sweep through its val twin (the grid ignores it anyway).
    sweep_options = {**request.sweep_options, "name": experiment_dir.name, "output_dir": str(experiment_dir.parent),
                     "sampler": "grid", "num_samples": len(layers) * len(seeds), "asha": {"enabled": False},
                     "metric": "val/" + options.metric.split("/", 1)[1], "mode": options.mode,
                     "resume": request.resume}
    for key in ("max_concurrent", "executor"):
        if getattr(options, key) is not None:
            sweep_options[key] = getattr(options, key)
    sweep = SweepRequest(search=space, options=SweepOptions.from_dict(sweep_options),
                         config_overrides=list(request.config_overrides))
    prepared = prepare_sweep(sweep, base=base)  # the sweep's own checks: the grid against the model, the options
    return AblationPlan(experiment_dir, layers, seeds, options.metric, options.mode, sweep, prepared)


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
    from .driver import run_sweep

    plan = plan_ablation(parse_ablation_args(overrides))
    write_grid_file(plan.grid_path, plan.layers, plan.seeds)
    write_json_atomic(plan.ablation_dir / SPEC_FILE, plan.spec())
    sweep = run_sweep(plan.sweep, prepared=plan.prepared)
    result = summarize_ablation(plan.experiment_dir)
    result["sweep"] = sweep
    return result


def ablate_command(overrides: Sequence[str]) -> int:
    """``medalign ablate-layers ...``: runs the ablation and prints the table and where it went.

    Returns:
        the sweep's exit status (:mod:`~medalign_platform.tune.outcome`: 0 complete, 1 errored
        trials, 3 partial, 130/143 interrupted), or 2 with the message on stderr for bad input.
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
        print(f"best layer: {best} ({result['metric']} {cell_text(stat)})")
    else:
        print(f"best layer: none yet (no finished trial reported {result['metric']})")
    print("files:")
    for kind, path in result["files"].items():
        print(f"  {kind:12s}{path}")
    print(f"tensorboard --logdir {result['files']['tensorboard']}   "
          f"(per trial: tensorboard --logdir {result['experiment_dir']})")
    sweep = result["sweep"]
    status, line = sweep_outcome(sweep, sweep["num_samples"], overrides, command="ablate-layers", prefix="ablation",
                                 experiment_dir=result["experiment_dir"])
    print(f"medalign ablate-layers: {line}", file=sys.stderr)
    return status
