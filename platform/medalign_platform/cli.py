"""The ``medalign`` command line: one console script, one subcommand per job.

Every subcommand takes Hydra-style overrides (``medalign sweep experiment=synthmed_vqa
trial.max_steps=50``). Configs are resolved here, on the driver; Ray workers only ever
receive plain dicts. ``python -m medalign_platform ...`` is the same program, so
``ray job submit -- python -m medalign_platform sweep ...`` works unchanged.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from . import __version__

# Subcommand -> (help, the issue that delivers it, built yet?).
SUBCOMMANDS = {
    "prepare": ("Build a dataset, the tiny expert teacher and tiny base student (SynthMed).", 3, True),
    "train": ("Run one MedAlign distillation on Ray Train.", 4, True),
    "sweep": ("Ray Tune + Optuna search over loss weights, layer and LoRA rank.", 5, True),
    "ablate-layers": ("Grid of distillation layers x seeds with everything else fixed.", 5, True),
    "status": ("Leaderboard and best configuration of an experiment directory.", 5, True),
    "dashboard": ("Start TensorBoard (and optuna-dashboard) for an experiment directory.", 5, True),
    "export": ("Export a run's LoRA adapter and steer weights for peft.", 4, True),
    "convert": ("Convert a released checkpoint: llava-med SRC OUT [VISION_TOWER] | unimed-clip SRC.pt OUT.", 11, True),
    "check": ("Preflight without weights: config, files, grids, dtype, GPU memory per trial.", 11, True),
}


def parse_overrides(overrides: Sequence[str]) -> dict:
    """Turns ``["a.b=1", "c=x"]`` into ``{"a": {"b": 1}, "c": "x"}`` (YAML-typed values)."""
    from omegaconf import OmegaConf

    bad = [item for item in overrides if "=" not in item or item.startswith("=")]
    if bad:
        raise SystemExit(f"medalign: overrides must look like key=value (got {bad}); e.g. trial.max_steps=50")
    return OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)), resolve=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medalign",
        description="MedAlign research platform: distil an expert medical CLIP into a Med-LVLM, "
        "and sweep it with Ray Tune + Optuna.",
    )
    parser.add_argument("--version", action="version", version=f"medalign-platform {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, _, _) in SUBCOMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        if name in ("status", "dashboard", "export"):
            sub.add_argument("path", nargs="?", help="experiment or run directory")
        if name == "export":
            sub.add_argument("--out", required=False, help="directory to write the adapter to")
        if name == "convert":
            from .convert.command import add_arguments

            add_arguments(sub)
            continue
        sub.add_argument("overrides", nargs="*", metavar="key=value", help="Hydra-style config overrides")
    return parser


def _prepare(args) -> int:
    from .synthmed.prepare import SynthMedPrepareSettings, prepare_synthmed, synthmed_root

    options = parse_overrides(args.overrides)
    dataset = options.pop("data", None)
    if dataset != "synthmed":
        raise SystemExit(f"medalign prepare: only data=synthmed can be prepared (got data={dataset!r})")
    try:
        settings = SynthMedPrepareSettings(**options)
    except TypeError as error:
        raise SystemExit(f"medalign prepare: {error}; valid keys: seed, n_train, n_val, n_test, cache_dir, progress")
    prepared = prepare_synthmed(settings)
    teacher, student = prepared.teacher_metrics, prepared.student_metrics
    print(f"SynthMed ready in {synthmed_root(settings.cache_dir)}")
    print(f"  data:    {prepared.data_dir}")
    print(f"  teacher: {prepared.teacher_dir}  R@1 (image->text, {teacher.get('n_pairs')} test pairs) = "
          f"{teacher.get('r_at_1', float('nan')):.3f}, CLS attention lift on lesions = "
          f"{teacher.get('attention_lift', float('nan')):.2f}x")
    print(f"  student: {prepared.student_dir}  val closed accuracy = {student.get('closed_accuracy', float('nan')):.3f}, "
          f"open recall = {student.get('open_recall', float('nan')):.3f}")
    return 0


def _train(args) -> int:
    from .run.driver import train_run

    result = train_run(args.overrides)
    metrics = result["metrics"]
    print(json.dumps(result, indent=2, sort_keys=True))
    print(f"medalign train: {metrics.get('step')} steps, {metrics.get('perf/samples_per_s', float('nan')):.1f} samples/s, "
          f"{100 * metrics.get('perf/outside_loop_share', float('nan')):.0f}% of worker wall time outside the training "
          f"loop; TensorBoard: tensorboard --logdir {result['tensorboard']}", file=sys.stderr)
    return 0


def _sweep(args) -> int:
    from .tune.results import status_report, write_results
    from .tune.sweep import run_sweep

    summary = run_sweep(args.overrides)
    experiment_dir = summary["experiment_dir"]
    print(f"medalign sweep: {summary['num_trials']} trials {summary['trials']} in {summary['wall_s']:.0f} s; "
          f"early stopping: {summary['early_stopping']}; summary: {experiment_dir}/summary.json", file=sys.stderr)
    print(status_report(write_results(experiment_dir), 10))
    return 0


def _ablate_layers(args) -> int:
    from .tune.ablation import ablate_command

    return ablate_command(args.overrides)


def _status(args) -> int:
    from .tune.results import status_command

    if not args.path:
        raise SystemExit("usage: medalign status EXP_DIR   (a folder written by medalign sweep or ablate-layers)")
    return status_command(args.path, args.overrides)


def _dashboard(args) -> int:
    from .tune.dashboard import dashboard_command

    if not args.path:
        raise SystemExit("usage: medalign dashboard EXP_DIR [port=6006] [optuna_port=8080]")
    return dashboard_command(args.path, args.overrides)


def _export(args) -> int:
    from .run.export import export_run

    if not args.path or not args.out:
        raise SystemExit("usage: medalign export RUN_DIR --out DIR")
    out = export_run(args.path, args.out)
    print(f"exported to {out}: load with peft.PeftModel.from_pretrained(base, '{out}') "
          "or medalign_platform.run.export.load_exported")
    return 0


def _convert(args) -> int:
    from .convert.command import convert_command

    return convert_command(args)


def _check(args) -> int:
    from .run.preflight import check_command

    return check_command(args.overrides)


HANDLERS = {"prepare": _prepare, "train": _train, "sweep": _sweep, "ablate-layers": _ablate_layers,
            "status": _status, "dashboard": _dashboard, "export": _export, "convert": _convert, "check": _check}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    parse_overrides(getattr(args, "overrides", []))  # reject malformed overrides before anything else
    _, issue, built = SUBCOMMANDS[args.command]
    if not built:
        print(
            f"medalign {args.command}: not built yet (tracked in issue #{issue}). "
            "Available now: prepare, train, sweep, export and the MedAlign library.",
            file=sys.stderr,
        )
        return 2
    from .convert.sources import ConversionError
    from .run.compose import ConfigError

    try:
        return HANDLERS[args.command](args)
    except (ConfigError, ConversionError, FileNotFoundError) as error:
        print(f"medalign {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
