"""What a sweep is asked to do (``sweep.*``, ``search=``, ``resume=``) and the plan it resolves to.

``medalign sweep experiment=synthmed_vqa search=medalign_default sweep.num_samples=16``:
the overrides are parsed once (:func:`parse_sweep_request`) into a :class:`SweepRequest`:
the search space, typed :class:`SweepOptions` (the ``sweep.*`` keys, with their defaults
and help text) and the run-config overrides. ``medalign ablate-layers`` builds the same
request object directly. :func:`resolve_plan` then fills what depends on the run config
and the search space (the sampler, the number of trials, ASHA's rungs, trial resources,
the executor) into a :class:`SweepPlan`, which ``sweep.json`` records for resume and status.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

from ..common.errors import ConfigError
from ..common.overrides import Override, as_tree, parse_overrides, split_overrides, texts
from ..common.settings import Settings, setting
from ..run.filesystems import is_uri, join, mirror_dir, normalize
from .study_storage import resolve_storage

if TYPE_CHECKING:
    from ..run.settings import RunSettings
    from .search_space import SearchSpace

logger = logging.getLogger(__name__)

SAMPLERS = ("tpe", "random", "cmaes", "nsga2", "grid")
Sampler = Literal["tpe", "random", "cmaes", "nsga2", "grid"]
Mode = Literal["max", "min"]


@dataclass
class AshaSettings(Settings):
    """ASHA early stopping on the training step (``sweep.asha.*``)."""

    section: ClassVar[str] = "sweep.asha"

    enabled: bool = setting(True, "Stop unpromising trials at their rungs (off for multi-objective sweeps).")
    grace_period: int | None = setting(None, "Steps before a trial can be stopped (default: the first evaluation).",
                                       ge=1)
    reduction_factor: float = setting(3, "Keep the top 1/reduction_factor of trials at each rung.", gt=1)
    max_t: int | None = setting(None, "The last rung in steps (default: trainer.max_steps).", ge=1)


@dataclass
class SweepOptions(Settings):
    """The ``sweep.*`` keys of ``medalign sweep`` (and ``resume=true``)."""

    section: ClassVar[str] = "sweep"

    name: str | None = setting(None, "Experiment folder name (default: <run.name>-<search>).")
    output_dir: str = setting("sweeps", "Experiments live in output_dir/name: a local folder (shared by every node of "
                                        "a multi-node cluster) or a URI such as s3://bucket/prefix.")
    storage: str | None = setting(None, "Optuna study: null/sqlite (EXP_DIR/optuna.db), journal "
                                        "(EXP_DIR/optuna.journal), a journal file path, or a database URL such as "
                                        "postgresql://user@host:5432/db (no password in it: use PGPASSWORD).")
    num_samples: int | None = setting(None, "Trials (default 8; the grid size for sampler=grid).", ge=1)
    max_concurrent: int = setting(2, "Trials at once (capped by a local cluster's resources).", ge=1)
    metric: str = setting("val/closed_accuracy", "The metric the sweep optimises.")
    mode: Mode = setting("max", "Direction of metric.")
    metrics: list[str] | None = setting(None, "Several metrics: a multi-objective sweep (Optuna), no ASHA.")
    modes: list[Mode] | None = setting(None, "One direction per metric (default: mode for each).")
    sampler: Sampler | None = setting(None, "tpe | random | cmaes | nsga2 | grid (default: grid for grid spaces, "
                                             "else tpe).")
    seed: int = setting(0, "Seeds the sampler.")
    n_startup_trials: int | None = setting(None, "TPE/CMA-ES random start-up trials (default num_samples // 4, "
                                                 "within 2..10).", ge=1)
    asha: AshaSettings = setting(factory=AshaSettings, help="ASHA early stopping.")
    trial_resources: dict[str, float] | None = setting(
        None, "Per trial worker, e.g. {CPU: 1, GPU: 0.5} (default: ray.resources_per_worker).")
    num_workers: int = setting(1, "Ray Train workers (DDP) per trial.", ge=1)
    executor: Literal["auto", "train", "inline"] = setting(
        "auto", "train: each trial a Ray Train run; inline: the loop in the trial actor; auto: inline for "
                "1-worker CPU trials, train for GPU or DDP ones.")
    resume: bool = setting(False, "Continue the sweep in output_dir/name (same as resume=true).")
    resume_errored: bool = setting(False, "On resume, continue errored trials from their checkpoints.")
    restart_errored: bool = setting(False, "On resume, restart errored trials from scratch.")
    reuse_actors: bool = setting(False, "Give a finished trial's actor to the next trial (saves its start and "
                                        "imports). Off by default: Ray Tune counts a cached actor that dies as two "
                                        "failures of the trial it is handed to and ends that trial ERROR, whatever "
                                        "ray.max_failures says. Needs sweep.asha.enabled=false.")
    verbose: int = setting(1, "Console: 0 the summary only; 1 one progress view (trial chatter in log files); "
                              "2 Tune's own tables and every trial's output too; 3 also Tune's per-result detail.",
                           ge=0, le=3)
    allow_test_selection: bool = setting(False, "Allow sweep.metric(s) on test/*: choosing on the test split makes "
                                                "its score an optimistic estimate (needs sweep.asha.enabled=false).")

    def check(self) -> None:
        if self.trial_resources is not None:
            self.trial_resources = {str(k).upper() if str(k).lower() in ("cpu", "gpu") else str(k): v
                                    for k, v in self.trial_resources.items()}
            for key, amount in self.trial_resources.items():
                if amount < 0:
                    self.fail(f"trial_resources.{key}", f"must be a number >= 0, got {amount}")
        if self.name is not None and ("/" in self.name or self.name in ("", ".", "..")):
            self.fail("name", f"must be a plain folder name (no '/', '.' or '..'), got {self.name!r}")
        from .study_storage import check_setting

        check_setting(self.storage)


@dataclass
class SweepRequest:
    """What a sweep is asked to do, before the config is composed.

    Attributes:
        search: a search-space name or file (``search=``), or a parsed space.
        options: the typed ``sweep.*`` options.
        config_overrides: the run-config overrides (``experiment=...``, ``trainer.*``...).
    """

    search: "str | SearchSpace | None"
    options: SweepOptions = dataclasses.field(default_factory=SweepOptions)
    config_overrides: list[str] = dataclasses.field(default_factory=list)


def is_sweep_key(key: str) -> bool:
    """Whether an override belongs to the sweep rather than the run config."""
    return key in ("search", "resume") or key == "sweep" or key.startswith("sweep.")


def parse_sweep_request(overrides: Sequence[str] | Sequence[Override]) -> SweepRequest:
    """Splits ``search=``/``resume=``/``sweep.*`` (typed into :class:`SweepOptions`) from run overrides.

    Raises:
        ConfigError: a malformed override or a bad ``sweep.*`` value, naming it.
    """
    parsed = [o if isinstance(o, Override) else None for o in overrides]
    if any(o is None for o in parsed):
        parsed = parse_overrides(list(overrides))
    mine, rest = split_overrides(parsed, is_sweep_key)
    search = next((o.value for o in mine if o.key == "search"), None)
    tree = as_tree([o for o in mine if o.key.startswith("sweep.")], strip="sweep.")
    for override in mine:
        if override.key == "resume":
            tree["resume"] = override.value
        elif override.key == "sweep":
            raise ConfigError(f"{override.text!r}: sweep is a section; set its keys, e.g. sweep.num_samples=8")
    return SweepRequest(search=search, options=SweepOptions.from_dict(tree), config_overrides=texts(rest))


@dataclass
class SweepPlan:
    """A sweep resolved against its run config and search space (recorded in ``sweep.json``)."""

    search: str
    name: str
    output_dir: str
    num_samples: int
    max_concurrent: int
    metrics: list[str]
    modes: list[str]
    sampler: str
    seed: int
    n_startup_trials: int
    asha: dict
    trial_resources: dict
    num_workers: int
    executor: str
    resume: bool
    resume_errored: bool
    restart_errored: bool
    verbose: int
    config_overrides: list[str] = dataclasses.field(default_factory=list)
    allow_test_selection: bool = False
    storage: str | None = None    # sweep.storage as given (see tune/study_storage.py)
    reuse_actors: bool = False    # absent from the sweep.json of sweeps recorded before it existed

    @property
    def multi_objective(self) -> bool:
        return len(self.metrics) > 1

    @property
    def experiment_location(self) -> str:
        """``output_dir/name``: an absolute local path or a URI (``s3://bucket/prefix/name``)."""
        return join(self.output_dir, self.name)

    @property
    def experiment_dir(self) -> Path:
        """The experiment folder as a local path.

        Raises:
            ConfigError: the experiment is on remote storage (use :attr:`experiment_location`).
        """
        if is_uri(self.output_dir):
            raise ConfigError(f"sweep {self.name} lives in remote storage ({self.experiment_location}); "
                              f"this step needs a local folder")
        return Path(self.output_dir) / self.name

    @property
    def study_dir(self) -> Path:
        """The local folder of a file study: the experiment folder, or for a remote experiment a
        private folder of the driver (the study is copied into the experiment while it runs)."""
        if is_uri(self.output_dir):
            return mirror_dir(self.experiment_location).parent / "driver-study"
        return self.experiment_dir

    @property
    def storage_url(self) -> str:
        return resolve_storage(self.storage, self.study_dir).url

    @property
    def asha_enabled(self) -> bool:
        return bool(self.asha.get("enabled", True)) and not self.multi_objective

    def to_dict(self) -> dict:
        return {k: copy.deepcopy(v) for k, v in self.__dict__.items()}


def resolve_executor(executor: str, num_workers: int, resources: dict) -> str:
    """``sweep.executor`` resolved: ``auto`` is inline only for 1-worker CPU trials.

    Inline saves Ray Train's fixed cost per trial (controller, worker actor, process group:
    ~10-25 s on a 2-core machine, ``benchmarks/sweep_overhead.py``), which dominates short
    CPU trials. A GPU trial runs on Ray Train like ``medalign train``: worker restarts,
    DDP, NCCL, the same code path as a single run, and its start-up is small beside a GPU
    run. Fractional GPUs (``trial_resources={GPU: 0.5}``) go to the Train workers, so two
    or more trials share a GPU either way.
    """
    if executor == "auto":
        return "inline" if num_workers == 1 and resources.get("GPU", 0) == 0 else "train"
    return executor


def resolve_plan(request: SweepRequest, base: "RunSettings", space: "SearchSpace") -> SweepPlan:
    """Fills the request's defaults that depend on the run config and the space, and checks them.

    Raises:
        ConfigError / SearchSpaceError: naming the key and the fix (before any Ray resource is requested).
    """
    from .search_space import SearchSpaceError

    options = request.options
    metrics = options.metrics if options.metrics is not None else [options.metric]
    if not metrics or not all(metrics):
        raise ConfigError(f"sweep.metrics must be a list of metric names like [val/closed_accuracy, val/grounding], "
                          f"got {metrics!r}")
    modes = options.modes if options.modes is not None else [options.mode] * len(metrics)
    if len(modes) != len(metrics):
        raise ConfigError(f"sweep.modes must be min or max, one per metric ({metrics}), got {modes!r}")
    for metric in metrics:
        if not metric.startswith(("val/", "test/")):
            raise ConfigError(f"sweep metric {metric!r} is not an evaluation metric; trials report val/* at each "
                              f"evaluation (e.g. val/closed_accuracy, val/open_recall, val/grounding)")
    on_test = [metric for metric in metrics if metric.startswith("test/")]
    if on_test and not options.allow_test_selection:
        raise ConfigError(f"sweep.metric={on_test[0]} selects trials on the test split, which makes the winner's test "
                          f"score an optimistic estimate; select on val/{on_test[0].split('/', 1)[1]}, or pass "
                          f"sweep.allow_test_selection=true to do it anyway")
    if on_test and options.asha.enabled and len(metrics) == 1:
        raise ConfigError(f"sweep.metric={on_test[0]}: test/* is reported only at the end of each trial, so ASHA "
                          f"cannot rank trials on it at its rungs; pass sweep.asha.enabled=false")

    sampler = options.sampler or ("grid" if space.has_grid else "tpe")
    if space.has_grid and sampler != "grid":
        raise SearchSpaceError(f"{space.source}: grid entries need sweep.sampler=grid (got {sampler}); use type "
                               f"choice for a sampled categorical")
    if sampler == "grid":
        space.grid_size()  # raises naming a continuous entry
    if len(metrics) > 1 and sampler == "cmaes":
        raise ConfigError("sweep.sampler=cmaes is single-objective; use tpe, random or nsga2 with sweep.metrics")
    if sampler == "cmaes":
        try:
            import cmaes  # noqa: F401
        except ImportError as error:
            raise ConfigError("sweep.sampler=cmaes needs the `cmaes` package (pip install cmaes); "
                              "or use sweep.sampler=tpe") from error
    num_samples = options.num_samples or (space.grid_size() if sampler == "grid" else 8)
    n_startup = options.n_startup_trials or min(10, max(2, num_samples // 4))

    trainer = base.trainer
    asha = options.asha.to_dict()
    first_eval = trainer.eval_every or trainer.max_steps
    asha["max_t"] = int(asha["max_t"] or trainer.max_steps)
    asha["grace_period"] = int(asha["grace_period"] or min(first_eval, trainer.max_steps))
    if not 1 <= asha["grace_period"] <= asha["max_t"]:
        raise ConfigError(f"sweep.asha.grace_period={asha['grace_period']} must be in 1..max_t ({asha['max_t']}) steps")

    resources = options.trial_resources
    if resources is None:
        resources = dict(base.ray.resources_per_worker or {"CPU": 1})
        if base.ray.use_gpu and "GPU" not in resources:
            resources["GPU"] = 1
    if 0 < resources.get("GPU", 0) < 1 and options.num_workers > 1:
        logger.warning("fractional GPUs with %d workers per trial: each worker gets %s GPU",
                       options.num_workers, resources["GPU"])

    executor = resolve_executor(options.executor, options.num_workers, resources)
    if executor == "inline" and options.num_workers != 1:
        raise ConfigError("sweep.executor=inline runs each trial in one process: it needs sweep.num_workers=1")

    search = request.search if isinstance(request.search, str) else space.source
    name = options.name or f"{base.run.name or 'sweep'}-{Path(str(search)).stem}"
    plan = SweepPlan(
        search=str(search), name=name, output_dir=normalize(options.output_dir), storage=options.storage,
        num_samples=num_samples, max_concurrent=options.max_concurrent, metrics=list(metrics), modes=list(modes),
        sampler=sampler, seed=options.seed, n_startup_trials=int(n_startup), asha=asha,
        trial_resources=dict(resources), num_workers=options.num_workers, executor=executor, resume=options.resume,
        resume_errored=options.resume_errored, restart_errored=options.restart_errored, verbose=options.verbose,
        config_overrides=list(request.config_overrides), allow_test_selection=options.allow_test_selection,
        reuse_actors=options.reuse_actors,
    )
    if plan.reuse_actors and plan.asha_enabled:
        # Tune cannot hand on the actor of a trial it stopped early (the trial's thread still
        # runs), so the next trial would error.
        raise ConfigError("sweep.reuse_actors=true cannot be used with ASHA early stopping; pass "
                          "sweep.asha.enabled=false, or leave sweep.reuse_actors=false")
    return plan
