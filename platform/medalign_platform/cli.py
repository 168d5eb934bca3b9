"""The ``medalign`` command line: one console script, one subcommand per job.

Every subcommand takes Hydra-style ``key=value`` overrides, parsed once by
:func:`medalign_platform.common.overrides.parse_overrides`
(``medalign sweep experiment=synthmed_vqa trainer.max_steps=50``). Configs are resolved
here, on the driver; Ray workers only ever receive plain dicts. ``python -m
medalign_platform ...`` is the same program, so ``ray job submit -- python -m
medalign_platform sweep ...`` works unchanged.

Every error prints as one line (:func:`~medalign_platform.common.errors.one_line`): input
errors (any :class:`~medalign_platform.common.errors.MedAlignError`, also when a Ray worker
raised it) name the key or file and the fix, exit status 2; a full disk or a permission
names the path, status 1; anything else is an internal error, status 1. ``--debug`` (anywhere
on the command line) adds the traceback. Ctrl-C exits with 130. ``medalign sweep`` returns
its own statuses (:mod:`medalign_platform.tune.outcome`): 0 complete, 1 trials errored,
3 unfinished trials, 130/143 interrupted by SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Callable, Sequence

from . import __version__
from .common.errors import one_line
from .common.overrides import as_tree, parse_overrides


def _prepare(args) -> int:
    from .common.errors import ConfigError
    from .synthmed.prepare import SynthMedPrepareSettings, prepare_synthmed, synthmed_root

    overrides = parse_overrides(args.overrides)
    dataset = next((o.value for o in reversed(overrides) if o.key == "data"), None)
    if dataset is None:
        raise ConfigError("name the dataset: data=synthmed, or a release: data=vqa_rad|slake|pathvqa|iu_xray|"
                          "mimic_cxr|llava_med data.source=PATH (docs/datasets.md)")
    if dataset != "synthmed":
        return _prepare_release(overrides)
    options = as_tree(overrides)
    options.pop("data", None)
    settings = SynthMedPrepareSettings.from_dict(options)
    prepared = prepare_synthmed(settings)
    teacher, student = prepared.teacher_metrics, prepared.student_metrics
    nan = float("nan")
    print(f"SynthMed ready in {synthmed_root(settings.cache_dir)}")
    print(f"  data:    {prepared.data_dir}")
    print(f"  teacher: {prepared.teacher_dir}  R@1 (image->text, {teacher.get('n_pairs')} test pairs) = "
          f"{teacher.get('r_at_1', nan):.3f}, CLS attention lift on lesions = "
          f"{teacher.get('attention_lift', nan):.2f}x")
    pretrain, task = student.get("pretrain_val", {}), student.get("task_val_zero_shot", {})
    print(f"  student: {prepared.student_dir}  pre-training val closed accuracy = "
          f"{pretrain.get('closed_accuracy', nan):.3f} (text-only prior "
          f"{student.get('baselines', {}).get('pretrain_val', {}).get('text_only_closed', nan):.3f}), "
          f"task val zero-shot = {task.get('closed_accuracy', nan):.3f}")
    if student.get("probes"):
        print("  probes on the student's visual tokens (held-out accuracy): "
              + ", ".join(f"{k} {v:.3f}" for k, v in student["probes"].items() if isinstance(v, float) and k != "seconds"))
    return 0


def _prepare_release(overrides) -> int:
    """``medalign prepare data=vqa_rad data.source=PATH [data.KEY=...] [rebuild=true]``."""
    from .common.errors import ConfigError
    from .common.overrides import texts
    from .data.prepare import prepare_command
    from .run.compose import compose_prepare_section

    rebuild = [o for o in overrides if o.key == "rebuild"]
    if rebuild and not isinstance(rebuild[-1].value, bool):
        raise ConfigError(f"rebuild must be true or false, got {rebuild[-1].value!r}")
    section = compose_prepare_section(texts(o for o in overrides if o.key != "rebuild"))
    prepare_command(section, rebuild=bool(rebuild) and rebuild[-1].value)
    return 0


def _train(args) -> int:
    from .run.driver import train_run

    result = train_run(args.overrides)
    metrics = result["metrics"]
    print(json.dumps(result, indent=2, sort_keys=True))
    print(f"medalign train: {metrics.get('step')} steps, {metrics.get('perf/samples_per_s', float('nan')):.1f} samples/s, "
          f"{100 * metrics.get('perf/outside_loop_share', float('nan')):.0f}% of worker wall time outside the training "
          f"loop; TensorBoard: {_tensorboard_hint(result)}", file=sys.stderr)
    return 0


def _tensorboard_hint(result: dict) -> str:
    """How to open a run's TensorBoard: TensorBoard reads local folders; a run in an object store
    is served from a local mirror by ``medalign dashboard``."""
    from .run.filesystems import is_uri

    if is_uri(result["tensorboard"]):
        return f"medalign dashboard {result['run_dir']}"
    return f"tensorboard --logdir {result['tensorboard']}"


def _sweep(args) -> int:
    from .tune.outcome import sweep_command

    return sweep_command(args.overrides)


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
    from .run.filesystems import is_uri

    out = export_run(args.path, args.out)
    if is_uri(out):  # peft and transformers load local folders
        print(f"exported to {out}: to load it, export to a local folder too (medalign export {args.path} --out DIR), "
              "then peft.PeftModel.from_pretrained(base, DIR) or medalign_platform.run.export.load_exported(DIR)")
    else:
        print(f"exported to {out}: load with peft.PeftModel.from_pretrained(base, '{out}') "
              "or medalign_platform.run.export.load_exported")
    return 0


def _convert(args) -> int:
    from .convert.command import convert_command

    return convert_command(args)


def _check(args) -> int:
    """``medalign check experiment=... [check.gpus=[80,141]] [sweep.trial_resources.GPU=0.5] [key=value ...]``."""
    from .common.errors import ConfigError
    from .common.overrides import split_overrides, texts
    from .run.driver import resolve_run_settings
    from .run.preflight import CheckOptions, PreflightReport, parse_gpus, run_preflight
    from .tune.settings import SweepOptions

    parsed = parse_overrides(args.overrides)
    check, rest = split_overrides(parsed, lambda key: key.startswith("check."))
    sweep, rest = split_overrides(rest, lambda key: key.startswith("sweep."))
    options = CheckOptions.from_dict(as_tree(check, strip="check."))
    trial_resources = SweepOptions.from_dict(as_tree(sweep, strip="sweep.")).trial_resources
    try:
        settings = resolve_run_settings(texts(rest), default_name="check")
    except ConfigError as error:  # a config problem is one of the preflight's findings
        print(PreflightReport(problems=[str(error)]).text())
        return 2
    report = run_preflight(settings, parse_gpus(options.gpus) if options.gpus is not None else None, trial_resources)
    print(report.text())
    return 0 if report.ok else 2


# Subcommand -> (help, handler, usage line when its path argument is missing, or None).
SUBCOMMANDS: dict[str, tuple[str, Callable, str | None]] = {
    "prepare": ("Build SynthMed (data, tiny expert teacher, tiny base student) or convert a public release "
                "(data=vqa_rad|slake|pathvqa|iu_xray|mimic_cxr|llava_med data.source=PATH).", _prepare, None),
    "train": ("Run one MedAlign distillation on Ray Train.", _train, None),
    "sweep": ("Ray Tune + Optuna search over loss weights, layer and LoRA rank.", _sweep, None),
    "ablate-layers": ("Grid of distillation layers x seeds with everything else fixed.", _ablate_layers, None),
    "status": ("Leaderboard and best configuration of an experiment directory.", _status,
               "medalign status EXP_DIR   (a folder written by medalign sweep or ablate-layers)"),
    "dashboard": ("Start TensorBoard (and optuna-dashboard) for an experiment directory.", _dashboard,
                  "medalign dashboard EXP_DIR [port=6006] [optuna_port=8080]"),
    "export": ("Export a run's LoRA adapter and steer weights for peft.", _export,
               "medalign export RUN_DIR --out DIR"),
    "convert": ("Convert a released checkpoint: llava-med SRC OUT [VISION_TOWER] | unimed-clip SRC.pt OUT.",
                _convert, None),
    "check": ("Preflight without weights: config, files, grids, dtype, GPU memory per trial.", _check, None),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medalign",
        description="MedAlign research platform: distil an expert medical CLIP into a Med-LVLM, "
        "and sweep it with Ray Tune + Optuna.",
    )
    parser.add_argument("--version", action="version", version=f"medalign-platform {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="print the traceback of an error (accepted anywhere on the command line)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, _, usage) in SUBCOMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        if usage is not None:
            sub.add_argument("path", nargs="?", help="experiment or run directory")
        if name == "export":
            sub.add_argument("--out", required=False, help="directory to write the adapter to")
        if name == "convert":
            from .convert.command import add_arguments

            add_arguments(sub)
            continue
        sub.add_argument("overrides", nargs="*", metavar="key=value", help="Hydra-style config overrides")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    help_text, handler, usage = SUBCOMMANDS[args.command]
    if usage is not None and not args.path:
        raise SystemExit(f"usage: {usage}")
    try:
        parse_overrides(getattr(args, "overrides", []))  # reject malformed overrides before anything else
        return handler(args)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print(f"medalign {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - the one place every error becomes one line
        if debug:
            traceback.print_exc()
        line, status = one_line(error)
        print(f"medalign {args.command}: {line}", file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())
