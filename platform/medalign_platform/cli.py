"""The ``medalign`` command line: one console script, one subcommand per job.

Every subcommand takes Hydra-style overrides (``medalign sweep experiment=synthmed_vqa
trial.max_steps=50``). Configs are resolved here, on the driver; Ray workers only ever
receive plain dicts. ``python -m medalign_platform ...`` is the same program, so
``ray job submit -- python -m medalign_platform sweep ...`` works unchanged.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import __version__

# Subcommand -> (help, the issue that delivers it). Unbuilt ones fail loudly, never silently.
SUBCOMMANDS = {
    "prepare": ("Build a dataset, the tiny expert teacher and tiny base student (SynthMed).", 3),
    "train": ("Run one MedAlign distillation on Ray Train.", 4),
    "sweep": ("Ray Tune + Optuna search over loss weights, layer and LoRA rank.", 5),
    "ablate-layers": ("Grid of distillation layers x seeds with everything else fixed.", 5),
    "status": ("Leaderboard and best configuration of an experiment directory.", 5),
    "dashboard": ("Start TensorBoard (and optuna-dashboard) for an experiment directory.", 5),
    "export": ("Export a run's LoRA adapter and steer weights for peft.", 4),
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
    for name, (help_text, _) in SUBCOMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        if name in ("status", "dashboard", "export"):
            sub.add_argument("path", nargs="?", help="experiment or run directory")
        sub.add_argument("overrides", nargs="*", metavar="key=value", help="Hydra-style config overrides")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    parse_overrides(args.overrides)  # reject malformed overrides before anything else
    _, issue = SUBCOMMANDS[args.command]
    print(
        f"medalign {args.command}: not built yet (tracked in issue #{issue}). "
        "Available now: the MedAlign library (medalign_platform.losses, .teacher, .target_cache, "
        ".student, .objective, .tiny) and benchmarks/step_bench.py.",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
