"""Composing run configs with Hydra on the driver: presets, overrides, resolvers.

Configs are Hydra-composed from ``experiments/`` (groups ``model``, ``teacher``, ``data``,
``distill``, ``lora``, ``optim``, ``trainer`` plus ``experiment/`` presets) on top of the
settings classes' defaults (registered as the config ``medalign_defaults``, see
:func:`medalign_platform.run.settings.defaults_tree`), and resolved to a plain dict. Typing
and checking that dict is :class:`~medalign_platform.run.settings.RunSettings`' job.

Config values may name prepared datasets through resolvers (``${synthmed:data}``). This
module knows them only by the dotted path of the function answering them
(:data:`RESOLVERS`), so the config layer imports no dataset code until a config uses one.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..common.errors import ConfigError

EXPERIMENTS_ENV = "MEDALIGN_EXPERIMENTS"
DEFAULTS_NAME = "medalign_defaults"

#: ``${name:key}`` resolvers: name -> "module:function", called with ``key`` (and OmegaConf's
#: ``_parent_`` / ``_root_`` nodes when the function takes them).
RESOLVERS = {
    "synthmed": "medalign_platform.synthmed.prepare:prepared_path",          # ${synthmed:data|teacher|student|cache}
    "prepared": "medalign_platform.data.prepare:resolve_prepared",          # ${prepared:train|val|test|image_root|n_train}
    "steps_for_epochs": "medalign_platform.data.prepare:steps_for_epochs",  # ${steps_for_epochs:9}
    "medalign_cache": "medalign_platform.common.stage_cache:cache_path",    # ${medalign_cache:targets}
}


def experiments_dir() -> Path:
    """``$MEDALIGN_EXPERIMENTS``, else ``experiments/`` of the source checkout, else of the cwd."""
    candidates = [os.environ.get(EXPERIMENTS_ENV), Path(__file__).resolve().parents[3] / "experiments",
                  Path.cwd() / "experiments"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "config.yaml").is_file():
            return Path(candidate).resolve()
    raise ConfigError(f"no experiments/config.yaml found; set {EXPERIMENTS_ENV} to the experiments folder")


def _resolver(target: str):
    """A resolver that imports ``target`` on its first use and passes it what its signature asks for."""
    module, function = target.split(":")

    def resolve(key, _parent_, _root_):
        func = getattr(importlib.import_module(module), function)
        wanted = inspect.signature(func).parameters
        extra = {name: node for name, node in (("_parent_", _parent_), ("_root_", _root_)) if name in wanted}
        value = func(key, **extra)
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)

    return resolve


def register() -> None:
    """Registers the resolvers and the settings defaults with OmegaConf / Hydra (idempotent)."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from .settings import defaults_tree

    for name, target in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, _resolver(target), use_cache=False)
    ConfigStore.instance().store(name=DEFAULTS_NAME, node=OmegaConf.create(defaults_tree()))


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

    Raises:
        ConfigError: Hydra or OmegaConf rejected an override or a value (the first line of
            their message), or a resolver's dataset is not prepared.
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    register()
    try:
        with (experiment_file_overrides(overrides) as composed_overrides,
              initialize_config_dir(config_dir=str(experiments_dir()), version_base="1.3")):
            composed = compose(config_name=config_name, overrides=composed_overrides)
        return OmegaConf.to_container(composed, resolve=True)
    except (HydraException, OmegaConfBaseException) as error:
        cause = error.__cause__ if isinstance(error.__cause__, (FileNotFoundError, ConfigError)) else None
        if cause is not None:
            raise ConfigError(str(cause)) from error
        message = "; ".join(line.strip() for line in str(error).splitlines() if line.strip())
        raise ConfigError(f"config composition failed: {message}") from error


def compose_prepare_section(overrides: Sequence[str]) -> dict:
    """The preparation keys of the composed ``data`` section (``medalign prepare data=NAME data.source=...``).

    Composes ``experiments/`` with the overrides but resolves only the keys that decide what
    is prepared (``name``, ``source``, ``language`` ...), so nothing else (models, other
    datasets, the prepared files themselves) needs to exist yet.
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from ..data.settings import PREPARE_KEYS

    register()
    try:
        with initialize_config_dir(config_dir=str(experiments_dir()), version_base="1.3"):
            composed = compose(config_name="config", overrides=list(overrides))
        return {key: composed.data.get(key) for key in PREPARE_KEYS if key in composed.data}
    except (HydraException, OmegaConfBaseException) as error:
        message = "; ".join(line.strip() for line in str(error).splitlines() if line.strip())
        raise ConfigError(f"config composition failed: {message}") from error
