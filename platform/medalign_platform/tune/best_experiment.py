"""``best_experiment.yaml``: the best finished trial as an experiment file that composes to its exact config.

``medalign train experiment=sweeps/NAME/results/best_experiment.yaml`` then reruns it, and
``medalign sweep experiment=<that file> search=...`` refines around it. The file is checked
when written: composing it must give the trial's config again (``run`` aside).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..common.atomic import write_text_atomic
from ..common.errors import ConfigError

logger = logging.getLogger(__name__)


def group_choices(overrides: Sequence[str]) -> dict[str, str | None]:
    """The config group options (``data: synthmed_vqa``, ...) that ``overrides`` compose, without
    the ``experiment`` preset and Hydra's own groups."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    from ..run.compose import experiment_file_overrides, experiments_dir

    try:
        with (experiment_file_overrides(overrides) as composed_overrides,
              initialize_config_dir(config_dir=str(experiments_dir()), version_base="1.3")):
            composed = compose(config_name="config", overrides=composed_overrides, return_hydra_config=True)
            choices = OmegaConf.to_container(composed.hydra.runtime.choices)
    except HydraException as error:
        raise ConfigError(f"cannot compose the sweep's base config again: {error}") from error
    return {k: v for k, v in choices.items() if not k.startswith("hydra") and k != "experiment"}


def best_run_config(best: dict, base_config: dict, sweep_name: str) -> dict:
    """The best trial's run config with its sweep-trial paths replaced by a plain run's."""
    config = json.loads(json.dumps(best["config"]))  # a deep copy with plain lists
    config["run"] = {"name": f"{sweep_name}-best", "output_dir": base_config.get("run", {}).get("output_dir", "runs")}
    return config


def _without_run(config: dict) -> dict:
    return {k: v for k, v in config.items() if k != "run"}


def _differences(expected: Any, got: Any, prefix: str = "") -> list[str]:
    """Dotted keys where two plain configs differ."""
    if isinstance(expected, dict) and isinstance(got, dict):
        out = []
        for key in sorted(set(expected) | set(got), key=str):
            out += _differences(expected.get(key, "<missing>"), got.get(key, "<missing>"), f"{prefix}{key}.")
        return out
    return [] if expected == got and type(expected) is type(got) else [prefix.rstrip(".")]


def best_experiment_text(config: dict, choices: dict | None, header: Sequence[str]) -> str:
    """An experiment YAML (``# @package _global_``) that composes exactly ``config``.

    The ``defaults`` list selects the same config group options as the sweep's base config
    (so every section has the same keys); the body sets every value, so nothing depends on
    the presets' current defaults.
    """
    import yaml

    class Dumper(yaml.SafeDumper):
        """Block mappings, one-line lists (``betas: [0.9, 0.999]``)."""

    Dumper.add_representer(list, lambda dumper, data: dumper.represent_sequence(
        "tag:yaml.org,2002:seq", data, flow_style=True))
    lines = ["# @package _global_", *(f"# {line}" if line else "#" for line in header), ""]
    if choices:
        # Hydra lists runtime choices last-composed first; the root config's order reads better.
        defaults = [f"  - override /{group}: {yaml.safe_dump(option).splitlines()[0]}"
                    for group, option in reversed(choices.items())]
        lines += ["defaults:", *defaults]
    lines.append(yaml.dump(config, Dumper=Dumper, sort_keys=False, default_flow_style=False, width=120).rstrip())
    return "\n".join(lines) + "\n"


def verify_experiment_file(path: Path, expected: dict) -> list[str]:
    """Composes ``experiment=<path>`` and returns the keys where it differs from ``expected``
    (``run`` aside); ``["<error>"]`` when it does not compose."""
    from ..run.compose import compose_config

    try:
        composed = compose_config([f"experiment={path}"])
    except ConfigError as error:
        return [f"does not compose: {error}"]
    return _differences(_without_run(expected), _without_run(composed))


def write_best_experiment(summary: dict, spec: dict, numbers: dict[str, int], path: Path) -> dict:
    """Writes ``best_experiment.yaml`` for the best finished trial and checks that it composes to it.

    Returns:
        ``{"path", "trial_id", "differences": [keys where composing differs], "command"}``, or
        ``{"path": None, "reason": ...}`` when no trial has finished with the metric yet.
    """
    best = summary["best"]
    metric, mode = summary["metrics"][0], summary["modes"][0]
    if best is None:
        return {"path": None, "reason": f"no finished trial reports {metric} yet"}
    settings = spec["settings"]
    config = best_run_config(best, spec["base_config"], settings["name"])
    try:
        choices = group_choices(spec["config_overrides"])
    except ConfigError as error:  # e.g. the experiment file the sweep was started from is gone
        logger.warning("best_experiment.yaml without a defaults list: %s", error)
        choices = None
    record = next(r for r in summary["records"] if r["trial_id"] == best["trial_id"])
    step, max_steps = record["metrics"].get("step"), config["trainer"].get("max_steps")
    values = ", ".join(f"{m} = {best['metrics'].get(m)}" for m in summary["metrics"])
    params = ", ".join(f"{k}={v}" for k, v in best["params"].items())
    command = f"medalign train experiment={path}"
    header = [f"Best trial of sweep {settings['name']} ({summary['experiment_dir']}), written by `medalign status`.",
              (f"  trial {best['trial_id']} (Optuna trial {numbers.get(best['trial_id'])}), step {step}/{max_steps}; "
               f"best by {metric} ({mode}) among finished trials"),
              f"  {values}",
              f"  searched: {params}",
              "The trial's full resolved run config; only run.name and run.output_dir are new.",
              f"Run it:          {command}",
              (f"Sweep around it: medalign sweep experiment={path} search={settings['search']} "
               f"sweep.name={settings['name']}-refine")]
    check = path.with_name(f".check.{uuid.uuid4().hex[:8]}.yaml")
    check.write_text(best_experiment_text(config, choices, header))
    try:
        differences = verify_experiment_file(check, config)
    finally:
        check.unlink(missing_ok=True)
    header.append("Checked when written: composes to exactly the trial's config" if not differences else
                  f"WARNING: composing this file differs from the trial's config at {differences}")
    write_text_atomic(path, best_experiment_text(config, choices, header))
    return {"path": str(path), "trial_id": best["trial_id"], "differences": differences, "command": command}
