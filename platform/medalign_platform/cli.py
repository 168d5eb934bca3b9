"""The ``medalign`` command line: one console script, one subcommand per job.

Every subcommand takes Hydra-style ``key=value`` overrides, parsed once by
:func:`medalign_platform.common.overrides.parse_overrides`
(``medalign sweep experiment=synthmed_vqa trainer.max_steps=50``). Configs are resolved
here, on the driver; Ray workers only ever receive plain dicts. ``python -m
medalign_platform ...`` is the same program, so ``ray job submit -- python -m
medalign_platform sweep ...`` works unchanged. Errors caused by input (any
:class:`~medalign_platform.common.errors.MedAlignError`) print as one line naming the fix,
with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from . import __version__
from .common.errors import MedAlignError
from .common.overrides import as_tree, parse_overrides


def _prepare(args) -> int:
    from .common.errors import ConfigError
    from .synthmed.prepare import SynthMedPrepareSettings, prepare_synthmed, synthmed_root

    options = as_tree(parse_overrides(args.overrides))
    dataset = options.pop("data", None)
    if dataset != "synthmed":
        raise ConfigError(f"only data=synthmed can be prepared (got data={dataset!r})")
    settings = SynthMedPrepareSettings.from_dict(options)
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
    from .tune.driver import run_sweep
    from .tune.results import status_report, write_results

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

    return status_command(args.path, args.overrides)


def _dashboard(args) -> int:
    from .tune.dashboard import dashboard_command

    return dashboard_command(args.path, args.overrides)


def _export(args) -> int:
    from .run.export import export_run

    if not args.out:
        raise SystemExit("usage: medalign export RUN_DIR --out DIR")
    out = export_run(args.path, args.out)
    print(f"exported to {out}: load with peft.PeftModel.from_pretrained(base, '{out}') "
          "or medalign_platform.run.export.load_exported")
    return 0


# Subcommand -> (help, handler, usage line when its path argument is missing, or None).
SUBCOMMANDS: dict[str, tuple[str, Callable, str | None]] = {
    "prepare": ("Build a dataset, the tiny expert teacher and tiny base student (SynthMed).", _prepare, None),
    "train": ("Run one MedAlign distillation on Ray Train.", _train, None),
    "sweep": ("Ray Tune + Optuna search over loss weights, layer and LoRA rank.", _sweep, None),
    "ablate-layers": ("Grid of distillation layers x seeds with everything else fixed.", _ablate_layers, None),
    "status": ("Leaderboard and best configuration of an experiment directory.", _status,
               "medalign status EXP_DIR   (a folder written by medalign sweep or ablate-layers)"),
    "dashboard": ("Start TensorBoard (and optuna-dashboard) for an experiment directory.", _dashboard,
                  "medalign dashboard EXP_DIR [port=6006] [optuna_port=8080]"),
    "export": ("Export a run's LoRA adapter and steer weights for peft.", _export,
               "medalign export RUN_DIR --out DIR"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medalign",
        description="MedAlign research platform: distil an expert medical CLIP into a Med-LVLM, "
        "and sweep it with Ray Tune + Optuna.",
    )
    parser.add_argument("--version", action="version", version=f"medalign-platform {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, _, usage) in SUBCOMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        if usage is not None:
            sub.add_argument("path", nargs="?", help="experiment or run directory")
        if name == "export":
            sub.add_argument("--out", required=False, help="directory to write the adapter to")
        sub.add_argument("overrides", nargs="*", metavar="key=value", help="Hydra-style config overrides")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    help_text, handler, usage = SUBCOMMANDS[args.command]
    if usage is not None and not args.path:
        raise SystemExit(f"usage: {usage}")
    try:
        parse_overrides(args.overrides)  # reject malformed overrides before anything else
        return handler(args)
    except (MedAlignError, FileNotFoundError) as error:
        print(f"medalign {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
