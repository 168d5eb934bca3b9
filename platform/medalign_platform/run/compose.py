"""Composing, resolving and validating run configs on the driver.

Configs are Hydra-composed from ``experiments/`` (groups ``model``, ``teacher``, ``data``,
``distill``, ``lora``, ``optim``, ``trainer`` plus ``experiment/`` presets), resolved to a
plain dict here and handed to Ray workers as such. Validation happens before any Ray
resource is requested: unknown keys, out-of-range values, a layer outside the model and
missing files all raise :class:`ConfigError` naming the key and the fix.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

EXPERIMENTS_ENV = "MEDALIGN_EXPERIMENTS"


class ConfigError(ValueError):
    """A config value is wrong; the message names the key and how to fix it."""


def experiments_dir() -> Path:
    """``$MEDALIGN_EXPERIMENTS``, else ``experiments/`` of the source checkout, else of the cwd."""
    candidates = [os.environ.get(EXPERIMENTS_ENV), Path(__file__).resolve().parents[3] / "experiments", Path.cwd() / "experiments"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "config.yaml").is_file():
            return Path(candidate).resolve()
    raise ConfigError(f"no experiments/config.yaml found; set {EXPERIMENTS_ENV} to the experiments folder")


def _synthmed_paths() -> dict:
    from ..synthmed.prepare import prepared_synthmed_record

    return prepared_synthmed_record()


def register_resolvers() -> None:
    """``${synthmed:data|teacher|student|cache}``: paths of the prepared embedded default."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("synthmed"):
        OmegaConf.register_new_resolver("synthmed", lambda key: str(_synthmed_paths()[key]), use_cache=False)


@contextlib.contextmanager
def experiment_file_overrides(overrides: Sequence[str]) -> Iterator[list[str]]:
    """``experiment=<path to a .yaml file>`` made composable: yields overrides that select it.

    Hydra only picks ``experiment`` presets from config folders, so the file is copied into
    a temporary ``experiment/`` folder that is added to ``hydra.searchpath`` (removed on
    exit). Like the presets, such a file starts with ``# @package _global_`` and may have a
    ``defaults:`` list of ``override /group: option`` entries. Other overrides pass unchanged.

    Raises:
        ConfigError: the file does not exist.
    """
    overrides = list(overrides)
    index = next((i for i, text in enumerate(overrides) if text.split("=", 1)[0] == "experiment"), None)
    value = overrides[index].split("=", 1)[1] if index is not None else ""
    if not value.endswith((".yaml", ".yml")) and "/" not in value:
        yield overrides  # a preset name from experiments/experiment/ (or none)
        return
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(f"experiment={value}: no such file; give an experiment YAML file (e.g. "
                          f"sweeps/NAME/results/best_experiment.yaml from `medalign status`) or a preset name "
                          f"from {experiments_dir() / 'experiment'}")
    with tempfile.TemporaryDirectory(prefix="medalign-experiment-") as folder:
        option = "file__" + "".join(c if c.isalnum() or c == "_" else "_" for c in path.stem)
        (Path(folder) / "experiment").mkdir()
        shutil.copyfile(path, Path(folder) / "experiment" / f"{option}.yaml")
        overrides[index] = f"experiment={option}"
        yield [f"hydra.searchpath=[file://{folder}]", *overrides]


def compose_config(overrides: Sequence[str] = (), config_name: str = "config") -> dict:
    """Composes ``experiments/`` with Hydra-style overrides and resolves it to a plain dict.

    ``experiment=`` takes a preset name or the path of an experiment YAML file
    (:func:`experiment_file_overrides`), e.g. the ``best_experiment.yaml`` of a sweep.
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    register_resolvers()
    try:
        with (experiment_file_overrides(overrides) as composed_overrides,
              initialize_config_dir(config_dir=str(experiments_dir()), version_base="1.3")):
            composed = compose(config_name=config_name, overrides=composed_overrides)
        return OmegaConf.to_container(composed, resolve=True)
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError(f"config composition failed: {error}") from error


def model_depth(model_path: str) -> int:
    """Number of LLM decoder layers, read from the checkpoint's config (no weights loaded).

    A local checkpoint's ``config.json`` is read directly: every sweep trial validates its
    sampled layer with this, and importing transformers just for it costs seconds per trial.
    """
    local = Path(model_path).expanduser() / "config.json"
    if local.is_file():
        data = json.loads(local.read_text())
        text = data.get("text_config") or data
        if isinstance(text.get("num_hidden_layers"), int):
            return int(text["num_hidden_layers"])
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    text = getattr(config, "text_config", config)
    return int(text.num_hidden_layers)


def validate_run_config(config: dict) -> None:
    """Checks a resolved run config before any Ray resources are spent.

    Raises:
        ConfigError: naming the offending key and the fix.
    """
    from .loop import RunSettings

    try:
        settings = RunSettings.from_config(config)
    except (TypeError, ValueError) as error:
        raise ConfigError(str(error)) from error
    model_path = settings.model.get("path")
    local = Path(str(model_path)).expanduser()
    if not model_path or (str(model_path).startswith(("/", ".", "~")) and not (local / "config.json").is_file()):
        raise ConfigError(f"model.path={model_path!r} has no config.json; point it at a save_pretrained directory")
    depth = model_depth(str(model_path))
    if not 1 <= settings.distill.layer <= depth - 1:
        raise ConfigError(
            f"distill.layer={settings.distill.layer} is outside the model: {model_path} has {depth} decoder layers, "
            f"so the layer must be in 1..{depth - 1}"
        )
    bad_lora = [i for i in settings.lora.layers_to_transform or [] if not 0 <= i < depth]
    if bad_lora:
        raise ConfigError(f"lora.layers_to_transform has {bad_lora}, outside 0..{depth - 1}")
    for split in ("train", "val", "test"):
        path = settings.data.get(split)
        if not path or not Path(path).is_file():
            raise ConfigError(f"data.{split}={path!r} is not a file; run `medalign prepare data=synthmed` or fix the path")
    teacher = settings.teacher
    for key in ("name", "cache_dir"):
        if not teacher.get(key):
            raise ConfigError(f"teacher.{key} is not set")
    validate_choices(config)
    name = str(teacher["name"])
    if name.startswith("hf-clip:") and name[len("hf-clip:"):].startswith(("/", ".", "~")):
        folder = Path(name[len("hf-clip:"):]).expanduser()
        if not (folder / "config.json").is_file():
            raise ConfigError(f"teacher.name={name!r}: no config.json there; point it at a transformers CLIPModel "
                              "folder (e.g. PubMedCLIP downloaded)")
    if name.startswith("local-dir:") and not (Path(name[len("local-dir:"):]) / "open_clip_config.json").is_file():
        raise ConfigError(f"teacher.name={name!r}: no open_clip_config.json there; run `medalign prepare data=synthmed`")
    if teacher.get("pretrained") and not Path(teacher["pretrained"]).is_file():
        raise ConfigError(f"teacher.pretrained={teacher['pretrained']!r} is not a file")


def validate_choices(config: dict) -> None:
    """The enumerated ``model.*`` / ``teacher.*`` settings (the run loop reads them as plain dicts).

    Raises:
        ConfigError: naming the key and the valid values.
    """
    from ..core.student import DTYPES
    from ..data.prompts import check_template
    from .evaluation import TEACHER_ATTENTION

    model, teacher = config.get("model") or {}, config.get("teacher") or {}
    if str(model.get("dtype", "float32")) not in DTYPES:
        raise ConfigError(f"model.dtype={model.get('dtype')!r}: choose one of {sorted(DTYPES)}")
    try:
        check_template(model.get("prompt_template", "auto"))
    except ValueError as error:
        raise ConfigError(str(error)) from error
    grid = model.get("grid")
    if grid is not None and (not isinstance(grid, (list, tuple)) or len(grid) != 2
                             or not all(isinstance(g, int) and g > 0 for g in grid)):
        raise ConfigError(f"model.grid={grid!r}: give [rows, cols] of the student's visual grid (e.g. [24, 24]) or null")
    if teacher.get("attention", "cls") not in TEACHER_ATTENTION:
        raise ConfigError(f"teacher.attention={teacher.get('attention')!r}: choose one of {list(TEACHER_ATTENTION)}")


def dump_config(config: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2, sort_keys=True))
