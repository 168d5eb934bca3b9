"""Sweep search spaces: YAML files in ``search_spaces/``, parsed into Ray Tune domains.

A search space file maps flat config keys (``section.key``, as in overrides) to entries::

    distill.lambda_align: {type: loguniform, low: 0.01, high: 2.0}
    distill.layer:        {type: int, low: 1, high: 3}          # inclusive bounds
    lora.rank:            {type: choice, values: [4, 8, 16]}
    lora.alpha:           {rule: "2*rank"}                     # derived: 2 x the trial's lora.rank
    distill.steer.mode:   {type: choice, values: ["off", full, low_rank]}
    points_to_evaluate:                                        # seed configs, evaluated first
      - {distill.layer: 2, distill.lambda_align: 1.0, lora.rank: 8}

Entry types (keys allowed besides ``type``):

============  =====================  ==========================================================
type          keys                   Ray Tune domain
============  =====================  ==========================================================
loguniform    low, high              ``tune.loguniform(low, high)``, ``0 < low <= high``
uniform       low, high, [step]      ``tune.uniform`` / ``tune.quniform(low, high, step)``
int           low, high, [step|log]  ``tune.randint(low, high + 1)`` / ``qrandint`` / ``lograndint``
choice        values                 ``tune.choice(values)``
grid          values                 ``tune.grid_search(values)`` (``sweep.sampler=grid``)
fixed         value                  the constant ``value``
(rule)        rule                   not sampled: ``"[F*]KEY[*F]"`` with KEY another entry or
                                     config key (a bare name means the same section)
============  =====================  ==========================================================

``points_to_evaluate`` lists seed points by the same flat keys; a key a point leaves out
takes the base config's value. :meth:`SearchSpace.validate` checks everything against the
composed run config and the model before any Ray resource is requested: unknown keys and
types, ``low > high``, values the config would reject, a layer outside ``1..depth-1``.
"""

from __future__ import annotations

import copy
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..common.errors import ConfigError
from ..common.keys import flatten, get_flat, has_flat, set_flat, with_values

if TYPE_CHECKING:
    from ..run.settings import RunSettings

SEARCH_SPACES_ENV = "MEDALIGN_SEARCH_SPACES"
RESERVED_KEYS = ("points_to_evaluate", "description")
TYPES = ("loguniform", "uniform", "int", "choice", "grid", "fixed")
TYPE_KEYS = {
    "loguniform": {"low", "high"},
    "uniform": {"low", "high", "step"},
    "int": {"low", "high", "step", "log"},
    "choice": {"values"},
    "grid": {"values"},
    "fixed": {"value"},
}
REQUIRED_KEYS = {"loguniform": {"low", "high"}, "uniform": {"low", "high"}, "int": {"low", "high"},
                 "choice": {"values"}, "grid": {"values"}, "fixed": {"value"}}
_RULE = re.compile(r"^\s*(?:(?P<pre>[0-9.eE+-]+)\s*\*\s*)?(?P<key>[A-Za-z_][\w.]*)"
                   r"\s*(?:\*\s*(?P<post>[0-9.eE+-]+)\s*)?$")
_YAML_BOOLEAN_HINT = ("YAML reads unquoted off/on/yes/no/true/false as booleans: quote the value, "
                      "e.g. values: [\"off\", full, low_rank]")


# Keys of otherwise fixed sections that a sweep may still vary (they change the targets, not the model).
SEARCHABLE_KEYS = ("teacher.attention",)
# Keys that look like knobs but cannot change a result: searching them only wastes trials.
NOT_SEARCHABLE = {
    "distill.teacher_max_normalize": "display-only (it scales the TensorBoard attention panels); neither loss can "
                                     "change with it, so it is not searchable -- drop the entry",
}


class SearchSpaceError(ConfigError):
    """A search space file is wrong; the message names the file, the entry and the fix."""


# --------------------------------------------------------------------------- entries


@dataclass(frozen=True)
class Param:
    """One searched config key and its distribution."""

    key: str
    type: str
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    values: tuple = ()
    value: Any = None

    @property
    def sampled(self) -> bool:
        return self.type != "fixed"

    def to_tune(self):
        """The Ray Tune domain (or constant) for this entry."""
        from ray import tune

        if self.type == "loguniform":
            return tune.loguniform(self.low, self.high)
        if self.type == "uniform":
            return tune.quniform(self.low, self.high, self.step) if self.step else tune.uniform(self.low, self.high)
        if self.type == "int":
            if self.log:
                return tune.lograndint(int(self.low), int(self.high) + 1)
            if self.step and self.step != 1:
                return tune.qrandint(int(self.low), int(self.high), int(self.step))
            return tune.randint(int(self.low), int(self.high) + 1)  # randint's upper bound is exclusive
        if self.type == "choice":
            return tune.choice(list(self.values))
        if self.type == "grid":
            return tune.grid_search(list(self.values))
        return copy.deepcopy(self.value)

    def to_optuna_domain(self):
        """The Tune domain an Optuna searcher can take (``grid`` becomes a categorical)."""
        from ray import tune

        return tune.choice(list(self.values)) if self.type == "grid" else self.to_tune()

    def contains(self, value: Any) -> bool:
        """Whether ``value`` can be drawn from this entry."""
        if self.type in ("choice", "grid"):
            return any(_same(value, v) for v in self.values)
        if self.type == "fixed":
            return _same(value, self.value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.type == "int" and int(value) != value:
            return False
        if not self.low <= value <= self.high:
            return False
        if self.step:
            return math.isclose((value - self.low) / self.step, round((value - self.low) / self.step), abs_tol=1e-9)
        return True

    def candidates(self) -> list:
        """Values that stand for the whole entry when checking it against the config."""
        if self.type in ("choice", "grid"):
            return list(self.values)
        if self.type == "fixed":
            return [self.value]
        if self.type == "int":
            return sorted({int(self.low), int(self.high)})
        return sorted({self.low, self.high})

    def describe(self) -> str:
        if self.type in ("choice", "grid"):
            return f"{{type: {self.type}, values: {list(self.values)}}}"
        if self.type == "fixed":
            return f"{{type: fixed, value: {self.value!r}}}"
        extra = (f", step: {self.step}" if self.step else "") + (", log: true" if self.log else "")
        return f"{{type: {self.type}, low: {self.low}, high: {self.high}{extra}}}"


@dataclass(frozen=True)
class Rule:
    """A derived key: ``key = factor * source`` (e.g. ``lora.alpha = 2 * lora.rank``)."""

    key: str
    source: str
    factor: float = 1.0
    text: str = ""

    def value(self, source_value: Any) -> Any:
        result = self.factor * source_value
        if isinstance(source_value, int) and float(result).is_integer():
            return int(result)
        return result

    def to_dict(self) -> dict:
        return {"key": self.key, "source": self.source, "factor": self.factor, "text": self.text}

    @classmethod
    def from_dict(cls, data: dict) -> "Rule":
        return cls(data["key"], data["source"], float(data["factor"]), data.get("text", ""))


def apply_rules(config: dict, rules: Iterable[Rule]) -> dict:
    """A deep copy of a trial config with the derived keys set from its sampled values."""
    out = copy.deepcopy(config)
    for rule in rules:
        set_flat(out, rule.key, rule.value(get_flat(out, rule.source)))
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b


# --------------------------------------------------------------------------- the space


@dataclass
class SearchSpace:
    """A parsed search space.

    Attributes:
        name: the file's stem (or ``"inline"``).
        source: where it came from, for error messages.
        params: searched (and fixed) entries by flat key, in file order.
        rules: derived entries by flat key.
        points: seed points by flat key, as written (see :meth:`seed_points`).
    """

    name: str
    source: str
    params: dict[str, Param] = field(default_factory=dict)
    rules: dict[str, Rule] = field(default_factory=dict)
    points: list[dict] = field(default_factory=list)
    description: str = ""

    # ------------------------------------------------------------------ views
    @property
    def sampled_keys(self) -> list[str]:
        return [key for key, param in self.params.items() if param.sampled]

    @property
    def has_grid(self) -> bool:
        return any(p.type == "grid" for p in self.params.values())

    def grid_size(self) -> int:
        """Number of points of the full grid over ``grid``/``choice``/``int`` entries."""
        size = 1
        for param in self.params.values():
            size *= len(self.grid_values(param))
        return size

    def grid_values(self, param: Param) -> list:
        if param.type in ("choice", "grid"):
            return list(param.values)
        if param.type == "fixed":
            return [param.value]
        if param.type == "int" and not param.log:
            step = int(param.step or 1)
            return list(range(int(param.low), int(param.high) + 1, step))
        raise SearchSpaceError(
            f"{self.source}: entry {param.key} {param.describe()} has no finite grid; sweep.sampler=grid needs "
            f"grid, choice or int entries (or pick sweep.sampler=tpe|random)"
        )

    def param_space(self, base_config: dict, *, for_optuna: bool = True) -> dict:
        """The whole run config with the searched keys replaced by Tune domains.

        Each trial's config is then the base config with the sampled keys set (the
        derived keys are set by :meth:`apply_rules` inside the trial).
        """
        space = copy.deepcopy(base_config)
        for key, param in self.params.items():
            set_flat(space, key, param.to_optuna_domain() if for_optuna else param.to_tune())
        return space

    def seed_points(self, base_config: dict, delimiter: str = "/") -> list[dict]:
        """``points_to_evaluate`` completed from the base config, keyed like the flattened space.

        Ray's ``OptunaSearch`` names parameters of a nested param space ``"distill/layer"``;
        points keyed any other way (nested dicts, ``"distill.layer"``) are enqueued in the
        study but silently never used, so every point is flattened with ``delimiter`` and
        holds every sampled key.
        """
        points = []
        for point in self.points:
            full = {key: point[key] if key in point else get_flat(base_config, key) for key in self.sampled_keys}
            points.append({key.replace(".", delimiter): value for key, value in full.items()})
        return points

    def apply_rules(self, config: dict) -> dict:
        """Sets the derived keys of a (copied) trial config from its sampled values."""
        return apply_rules(config, self.rules.values())

    def to_dict(self) -> dict:
        """A plain-data description of the space (what was searched), for records."""
        out: dict = {key: _param_dict(param) for key, param in self.params.items()}
        out.update({key: {"rule": rule.text} for key, rule in self.rules.items()})
        if self.points:
            out["points_to_evaluate"] = copy.deepcopy(self.points)
        return out

    # ------------------------------------------------------------------ validation
    def validate(self, base: "RunSettings | dict", depth: int | None = None) -> None:
        """Checks every entry and seed point against the run config and the model.

        Every candidate value is put into the base config and typed by the run's own
        settings classes, so a search space can only hold values ``medalign train`` accepts;
        the distillation layer goes through the same check as the run's
        (:func:`~medalign_platform.core.student.check_layer`).

        Args:
            base: the checked base run settings (or their plain config) the trials start from.
            depth: the model's decoder depth (read from ``model.path`` when None).

        Raises:
            SearchSpaceError: naming the file, the entry and the fix.
        """
        from ..core.student import check_layer, model_depth
        from ..run.settings import RunSettings

        settings = base if isinstance(base, RunSettings) else RunSettings.from_config(base)
        base_config = settings.to_dict()
        for key in [*self.params, *self.rules]:
            if not has_flat(base_config, key):
                section = key.split(".")[0]
                known = (sorted(flatten({section: base_config[section]})) if isinstance(base_config.get(section), dict)
                         else sorted(k for k in base_config if k != "run"))
                raise SearchSpaceError(f"{self.source}: entry {key}: unknown config key; known keys there: {known}")
            if key in NOT_SEARCHABLE:
                raise SearchSpaceError(f"{self.source}: entry {key}: {NOT_SEARCHABLE[key]}")
            if key.split(".")[0] in ("run", "ray", "model", "teacher", "data", "tensorboard") \
                    and key not in SEARCHABLE_KEYS:
                raise SearchSpaceError(
                    f"{self.source}: entry {key}: section '{key.split('.')[0]}' cannot be searched; "
                    f"search distill.*, lora.*, optim.*, trainer.* keys or {', '.join(SEARCHABLE_KEYS)}"
                )
            if isinstance(get_flat(base_config, key), dict):
                raise SearchSpaceError(f"{self.source}: entry {key} is a whole config section; name one of its keys")
        for key, rule in self.rules.items():
            if key in self.params:
                raise SearchSpaceError(f"{self.source}: entry {key} is both sampled and a rule")
            if not has_flat(base_config, rule.source):
                raise SearchSpaceError(
                    f"{self.source}: entry {key}: rule {rule.text!r} refers to {rule.source}, which is not a config key"
                )
            if rule.source in self.rules:
                raise SearchSpaceError(f"{self.source}: entry {key}: rule {rule.text!r} refers to another rule")

        for key, param in self.params.items():
            base_value = get_flat(base_config, key)
            _check_type(self.source, param, base_value)
            if key == "distill.layer":
                depth = depth if depth is not None else model_depth(str(settings.model.path))
                for value in param.candidates():
                    try:
                        check_layer(value, depth, str(settings.model.path))
                    except ConfigError as error:
                        raise SearchSpaceError(f"{self.source}: entry distill.layer {param.describe()}: {error}") \
                            from None
            for value in param.candidates():
                self._check_config(base_config, {key: value}, f"entry {key} value {value!r}")

        for index, point in enumerate(self.points):
            for key, value in point.items():
                if key in self.rules:
                    raise SearchSpaceError(
                        f"{self.source}: points_to_evaluate[{index}] sets {key}, which a rule derives; drop it"
                    )
                if key not in self.params:
                    raise SearchSpaceError(
                        f"{self.source}: points_to_evaluate[{index}] sets {key}, which is not searched; "
                        f"searched keys: {self.sampled_keys}"
                    )
            for key in self.sampled_keys:
                param = self.params[key]
                given = key in point
                value = point[key] if given else get_flat(base_config, key)
                if not param.contains(value):
                    where = "sets" if given else "leaves out (so takes the base config's value)"
                    raise SearchSpaceError(
                        f"{self.source}: points_to_evaluate[{index}] {where} {key}={value!r}, outside the entry "
                        f"{param.describe()}" + ("" if given else f"; add {key} to the point")
                    )
            values = {key: point[key] for key in point}
            self._check_config(base_config, values, f"points_to_evaluate[{index}]")

    def _check_config(self, base_config: dict, values: dict, what: str) -> None:
        from ..run.settings import RunSettings

        config = self.apply_rules(with_values(base_config, values))
        try:
            RunSettings.from_config(config)
        except ConfigError as error:
            hint = f"; {_YAML_BOOLEAN_HINT}" if any(isinstance(v, bool) for v in values.values()) else ""
            raise SearchSpaceError(f"{self.source}: {what} is rejected by the run config: {error}{hint}") from error


def _param_dict(param: Param) -> dict:
    if param.type in ("choice", "grid"):
        return {"type": param.type, "values": list(param.values)}
    if param.type == "fixed":
        return {"type": "fixed", "value": param.value}
    out = {"type": param.type, "low": param.low, "high": param.high}
    if param.step:
        out["step"] = param.step
    if param.log:
        out["log"] = True
    return out


def _check_type(source: str, param: Param, base_value: Any) -> None:
    """Numeric entries on numeric keys, integer entries on integer keys, strings on strings."""
    if param.type in ("loguniform", "uniform") and isinstance(base_value, int) and not isinstance(base_value, bool):
        raise SearchSpaceError(
            f"{source}: entry {param.key} is an integer setting (base value {base_value}); "
            f"use type int, not {param.type}"
        )
    if param.type in ("loguniform", "uniform", "int") and isinstance(base_value, (str, bool)):
        raise SearchSpaceError(
            f"{source}: entry {param.key} is a {type(base_value).__name__} setting (base value {base_value!r}); "
            f"use type choice, not {param.type}"
        )
    if isinstance(base_value, str) and not isinstance(base_value, bool):
        bad = [v for v in param.candidates() if not isinstance(v, str)]
        if bad:
            hint = f"; {_YAML_BOOLEAN_HINT}" if any(isinstance(v, bool) for v in bad) else ""
            raise SearchSpaceError(
                f"{source}: entry {param.key} is a string setting but {param.describe()} has non-strings {bad}{hint}"
            )


# --------------------------------------------------------------------------- parsing


def _number(source: str, key: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SearchSpaceError(f"{source}: entry {key}: {name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise SearchSpaceError(f"{source}: entry {key}: {name} must be finite, got {value!r}")
    return value


def _parse_entry(source: str, key: str, entry: Any) -> Param | Rule:
    if not isinstance(entry, dict):
        raise SearchSpaceError(
            f"{source}: entry {key} must be a mapping like {{type: loguniform, low: 0.01, high: 2.0}}, got {entry!r}"
        )
    if "rule" in entry:
        extra = sorted(set(entry) - {"rule"})
        if extra:
            raise SearchSpaceError(f"{source}: entry {key}: a rule entry takes only 'rule', got also {extra}")
        return _parse_rule(source, key, entry["rule"])
    kind = entry.get("type")
    if kind not in TYPES:
        raise SearchSpaceError(
            f"{source}: entry {key}: unknown type {kind!r}; valid types: {list(TYPES)} (or a 'rule')")
    unknown = sorted(set(entry) - TYPE_KEYS[kind] - {"type"})
    if unknown:
        raise SearchSpaceError(
            f"{source}: entry {key}: unknown key(s) {unknown} for type {kind}; valid keys: {sorted(TYPE_KEYS[kind])}"
        )
    missing = sorted(REQUIRED_KEYS[kind] - set(entry))
    if missing:
        raise SearchSpaceError(f"{source}: entry {key}: type {kind} needs {missing}")
    if kind in ("choice", "grid"):
        values = entry["values"]
        if not isinstance(values, list) or not values:
            raise SearchSpaceError(f"{source}: entry {key}: values must be a non-empty list, got {values!r}")
        if any(isinstance(v, (dict, list)) for v in values):
            raise SearchSpaceError(f"{source}: entry {key}: values must be scalars, got {values!r}")
        if len({repr(v) for v in values}) != len(values):
            raise SearchSpaceError(f"{source}: entry {key}: values repeat: {values!r}")
        return Param(key, kind, values=tuple(values))
    if kind == "fixed":
        return Param(key, kind, value=entry["value"])
    low = _number(source, key, "low", entry["low"])
    high = _number(source, key, "high", entry["high"])
    if low > high:
        raise SearchSpaceError(f"{source}: entry {key}: low ({low}) > high ({high}); swap them")
    step = entry.get("step")
    log = entry.get("log", False)
    if not isinstance(log, bool):
        raise SearchSpaceError(f"{source}: entry {key}: log must be true or false, got {log!r}")
    if step is not None:
        step = _number(source, key, "step", step)
        if step <= 0:
            raise SearchSpaceError(f"{source}: entry {key}: step must be > 0, got {step}")
    if kind == "loguniform" and low <= 0:
        raise SearchSpaceError(f"{source}: entry {key}: loguniform needs low > 0, got {low}")
    if kind == "int":
        for name, value in (("low", low), ("high", high), ("step", step)):
            if value is not None and int(value) != value:
                raise SearchSpaceError(f"{source}: entry {key}: type int needs an integer {name}, got {value!r}")
        if log and step not in (None, 1):
            raise SearchSpaceError(f"{source}: entry {key}: type int takes step or log, not both")
        if log and low < 1:
            raise SearchSpaceError(f"{source}: entry {key}: type int with log needs low >= 1, got {low}")
        low, high, step = int(low), int(high), (int(step) if step is not None else None)
    if step is not None and not math.isclose((high - low) / step, round((high - low) / step), abs_tol=1e-9):
        raise SearchSpaceError(f"{source}: entry {key}: high - low ({high - low}) is not a multiple of step ({step})")
    return Param(key, kind, low=low, high=high, step=step, log=log)


def _parse_rule(source: str, key: str, text: Any) -> Rule:
    match = _RULE.match(str(text)) if isinstance(text, (str, int, float)) else None
    if not match or (match["pre"] and match["post"]):
        raise SearchSpaceError(
            f"{source}: entry {key}: rule {text!r} is not of the form \"KEY\", \"F*KEY\" or \"KEY*F\" "
            f"(e.g. lora.alpha: {{rule: \"2*rank\"}})"
        )
    factor_text = match["pre"] or match["post"] or "1"
    try:
        factor = float(factor_text)
    except ValueError as error:
        raise SearchSpaceError(f"{source}: entry {key}: rule {text!r} has a bad factor {factor_text!r}") from error
    source_key = match["key"]
    if "." not in source_key:  # a bare name refers to the same section: lora.alpha: 2*rank -> lora.rank
        source_key = ".".join([*key.split(".")[:-1], source_key])
    return Rule(key, source_key, factor, str(text))


def parse_search_space(data: Any, source: str = "<inline>", name: str = "inline") -> SearchSpace:
    """Parses the YAML content of a search space file.

    Raises:
        SearchSpaceError: naming ``source`` and the entry.
    """
    if not isinstance(data, dict) or not data:
        raise SearchSpaceError(f"{source}: a search space must be a non-empty mapping of config keys to entries")
    space = SearchSpace(name=name, source=source, description=str(data.get("description", "")))
    for key, entry in data.items():
        if key in RESERVED_KEYS:
            continue
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", key):
            raise SearchSpaceError(
                f"{source}: entry {key!r}: keys are flat config keys like distill.lambda_align "
                f"(reserved keys: {list(RESERVED_KEYS)})"
            )
        parsed = _parse_entry(source, key, entry)
        if isinstance(parsed, Rule):
            space.rules[key] = parsed
        else:
            space.params[key] = parsed
    if not space.sampled_keys:
        raise SearchSpaceError(f"{source}: nothing to search: no entry has a sampled type")
    points = data.get("points_to_evaluate") or []
    if not isinstance(points, list) or not all(isinstance(p, dict) for p in points):
        raise SearchSpaceError(f"{source}: points_to_evaluate must be a list of mappings of flat config keys to values")
    for index, point in enumerate(points):
        nested = [k for k, v in point.items() if isinstance(v, dict)]
        if nested:
            raise SearchSpaceError(
                f"{source}: points_to_evaluate[{index}] nests {nested}; write flat keys like distill.layer: 2"
            )
    space.points = [dict(p) for p in points]
    return space


def search_spaces_dir() -> Path:
    """``$MEDALIGN_SEARCH_SPACES``, else ``search_spaces/`` of the source checkout, else of the cwd."""
    candidates = [os.environ.get(SEARCH_SPACES_ENV), Path(__file__).resolve().parents[3] / "search_spaces",
                  Path.cwd() / "search_spaces"]
    for candidate in candidates:
        if candidate and Path(candidate).is_dir():
            return Path(candidate).resolve()
    raise SearchSpaceError(f"no search_spaces/ folder found; set {SEARCH_SPACES_ENV} to it")


def available_search_spaces() -> list[str]:
    try:
        return sorted(p.stem for p in search_spaces_dir().glob("*.yaml"))
    except SearchSpaceError:
        return []


def search_space_path(name: str) -> Path:
    """The file for ``search=NAME``: ``search_spaces/NAME.yaml``, or a path to a YAML file."""
    direct = Path(name).expanduser()
    if direct.suffix in (".yaml", ".yml") and direct.is_file():
        return direct.resolve()
    path = search_spaces_dir() / f"{name}.yaml"
    if not path.is_file():
        raise SearchSpaceError(
            f"search={name}: no {path}; available search spaces: {available_search_spaces()} (or give a .yaml path)"
        )
    return path


def load_search_space(name: str) -> SearchSpace:
    """Reads and parses ``search=NAME`` (see :func:`search_space_path`); not yet validated."""
    import yaml

    path = search_space_path(name)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise SearchSpaceError(f"{path}: not valid YAML: {error}") from error
    return parse_search_space(data, source=str(path), name=path.stem)
