"""The typed view of a run config: one settings class per section, built once per process.

A composed run config is a plain dict with the sections ``model``, ``teacher``, ``data``,
``distill``, ``lora``, ``optim``, ``trainer``, ``ray``, ``run`` and ``tensorboard``.
:meth:`RunSettings.from_config` turns it into typed sections (unknown keys, wrong types and
out-of-range values fail there, naming the key); :meth:`RunSettings.to_dict` gives back
the complete plain dict, defaults filled in, which is what the driver records and hands to
Ray workers. :meth:`RunSettings.check_paths` checks what lies on disk (files, model depth,
the distillation layer) and runs on the driver before Ray spends anything.

The defaults of every section live in its class, here or beside the code that uses it
(:class:`~medalign_platform.core.objective.DistillSettings`,
:class:`~medalign_platform.core.student.LoraSettings`,
:class:`~medalign_platform.data.splits.DataSettings`); the YAML groups in ``experiments/``
set preset values on top (:func:`defaults_tree` is registered with Hydra as their base).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from ..common.errors import ConfigError
from ..common.settings import Settings, setting
from ..core.objective import DistillSettings
from ..core.student import LoraSettings, check_layer, model_depth
from ..data.settings import SPLITS, DataSettings


@dataclass
class ModelSettings(Settings):
    """The student checkpoint."""

    section: ClassVar[str] = "model"

    path: str | None = setting(None, "Student: a save_pretrained directory or a hub id (LLaVA family).")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = setting(
        "sdpa", "Attention kernel of the student; the tap works with all three.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = setting(
        "auto", "The student's weights as loaded, in training and evaluation alike (LoRA and steer stay "
                "float32); auto: bfloat16 on a GPU (half the memory), float32 on the CPU.")
    prompt_template: str = setting("auto", "auto (the processor's chat template) | llava_v1 | vicuna_v1 | "
                                           "mistral_instruct | qwen_chatml | a format string with {question}.")
    grid: list[int] | None = setting(None, "The visual grid [rows, cols] this preset expects (checked at load and by "
                                           "medalign check; null skips).")
    vision_feature_layer: int | None = setting(None, "The checkpoint's vision_feature_layer this preset expects, e.g. "
                                                     "-2 (checked; null skips).")

    def check(self) -> None:
        from ..data.prompts import check_template

        try:
            check_template(self.prompt_template)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        if self.grid is not None and (len(self.grid) != 2 or min(self.grid) < 1):
            self.fail("grid", f"={self.grid!r}: give [rows, cols] of the student's visual grid (e.g. [24, 24]) or null")


@dataclass
class TeacherSettings(Settings):
    """The frozen expert CLIP and the shared cache of its targets."""

    section: ClassVar[str] = "teacher"

    name: str | None = setting(None, "open_clip model: hf-hub:ORG/REPO, local-dir:PATH, or a config name.")
    pretrained: str | None = setting(None, "Checkpoint file or open_clip tag, for config names only.")
    cache_dir: str | None = setting(None, "Folder of the fp16 teacher-target cache shared by runs and trials.")
    factory: str | None = setting(None, "package.module:function that builds the teacher from this section instead "
                                        "of loading teacher.name (e.g. SynthMed's oracle teacher).")
    attention: Literal["cls", "prompt_aware"] = setting(
        "cls", "Attention target: cls (the CLS row, per image) or prompt_aware (conditioned on each question through "
               "the text tower, cached per image and question). Searchable.")


@dataclass
class OptimSettings(Settings):
    """AdamW with a cosine schedule and linear warmup."""

    section: ClassVar[str] = "optim"

    lr: float = setting(2e-4, "Peak learning rate (LoRA and steer alike).", gt=0)
    weight_decay: float = setting(0.0, "AdamW weight decay.", ge=0)
    warmup_ratio: float = setting(0.03, "Share of the steps spent in linear warmup.", ge=0, lt=1)
    grad_clip: float = setting(1.0, "Max gradient norm; 0 disables clipping.", ge=0)
    betas: tuple[float, float] = setting((0.9, 0.999), "AdamW betas.")


@dataclass
class TrainerSettings(Settings):
    """Steps, batching, evaluation and checkpoint cadence of one run."""

    section: ClassVar[str] = "trainer"

    max_steps: int = setting(200, "Optimiser steps.", ge=1)
    batch_size: int = setting(8, "Samples per device per micro-batch.", ge=1)
    grad_accum: int = setting(1, "Micro-batches per optimiser step.", ge=1)
    eval_every: int = setting(50, "Evaluate on val (and checkpoint) every N steps; 0 = at the end only.", ge=0)
    val_size: int = setting(200, "Val questions per evaluation (0 = all).", ge=0)
    test_size: int = setting(0, "Test questions at the end (0 = all).", ge=0)
    eval_batch_size: int = setting(32, "Prompts per generate() call.", ge=1)
    max_new_tokens: int = setting(16, "Greedy decoding length at evaluation.", ge=1)
    num_beams: int = setting(1, "Beam search width at evaluation (1 = greedy).", ge=1)
    log_every: int = setting(10, "Report training scalars every N steps.", ge=0)
    seed: int = setting(0, "Seeds LoRA/steer weights, data order and dropout.")
    precision: Literal["auto", "bf16", "fp32"] = setting("auto", "auto: bf16 autocast on GPU, fp32 on CPU.")
    num_threads: int = setting(0, "torch CPU threads per worker (0 = leave as is).", ge=0)
    data_workers: int = setting(
        2, "DataLoader worker processes per training process (image decode, processor, teacher targets); "
           "0 = in the training process. Capped at the CPUs the process holds minus one (inside Ray: its "
           "CPU resources, e.g. ray.resources_per_worker.CPU or sweep.trial_resources.CPU).", ge=0)
    prefetch_batches: int = setting(4, "Micro-batches each data worker prepares ahead.", ge=1)
    gradient_checkpointing: bool = setting(False, "Recompute decoder blocks in backward (non-reentrant; works with "
                                                  "the tap's hooks and LoRA): activation memory drops to about one "
                                                  "layer input per block; a 7B step costs ~1.5x (measured on an H200).")
    compile: bool = setting(
        False, "torch.compile each LLM decoder block of the student (the tap's hooks compile with "
               "block L); evaluation runs eager.")


@dataclass
class RaySettings(Settings):
    """Where the run executes and how Ray Train keeps it alive."""

    section: ClassVar[str] = "ray"

    address: str | None = setting(None, "null: start or join a local cluster; 'auto' or ray://... to join one.")
    # Ray's dashboard is a head process with 9 module processes: ~2.6 s more CPU per cluster
    # start on a 2-core machine (benchmarks/ray_cluster_cost.py, docs/run.md).
    include_dashboard: bool = setting(True, "Start Ray's dashboard (jobs, actors, Train runs; port 8265) with a "
                                            "local cluster the platform starts; ignored when joining a cluster.")
    num_workers: int = setting(1, "Data-parallel workers (DDP: gloo on CPU, NCCL on GPU).", ge=1)
    use_gpu: bool = setting(False, "One GPU per worker.")
    resources_per_worker: dict[str, float] = setting(factory=lambda: {"CPU": 1.0},
                                                     help="Ray resources each worker holds.")
    max_failures: int = setting(2, "Worker failures tolerated; the run resumes from its last checkpoint.", ge=0)
    num_to_keep: int | None = setting(2, "Checkpoints kept, best by checkpoint_score (null: all).", ge=1)
    checkpoint_score: str | None = setting("val/closed_accuracy", "Metric that ranks checkpoints.")
    checkpoint_mode: Literal["max", "min"] = setting("max", "Direction of checkpoint_score.")
    # Ray Train's control loop: Ray's defaults (2 s polling, a preemption-watcher actor per
    # run) cost ~4 s per run on a laptop; these only change how fast the controller notices state.
    controller_poll_s: float = setting(0.2, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (Ray's default: 2.0).", gt=0, le=60)
    preemption_watcher: Literal["auto", True, False] = setting(
        "auto", "auto: only when joining a cluster (spot nodes); true | false.")
    gpu_memory_gib: float | str | list[float | str] | None = setting(
        None, "Memory of each cluster GPU (GiB, or names such as H100-80GB) for the trial-size check of medalign "
              "sweep / check when the driver cannot see the GPUs itself.")

    def check(self) -> None:
        for key, amount in self.resources_per_worker.items():
            if amount < 0:
                self.fail(f"resources_per_worker.{key}", f"must be >= 0, got {amount}")


@dataclass
class OutputSettings(Settings):
    """Where the run's checkpoints, records and TensorBoard events go (the ``run`` section)."""

    section: ClassVar[str] = "run"

    name: str | None = setting(None, "Run folder name under output_dir (default: run-<time>).")
    output_dir: str = setting("runs", "Ray Train storage path: a local folder (shared by every node of a multi-node "
                                      "cluster) or a URI such as s3://bucket/prefix.")
    log_dir: str | None = setting(None, "TensorBoard folder (default: <output_dir>/<name>/tensorboard).")
    console_log: str | None = setting(None, "File the run's worker processes write their stdout/stderr to "
                                            "(a sweep sets one per trial); null: the console.")

    def check(self) -> None:
        if self.name is not None and (not self.name.strip() or self.name in (".", "..") or "/" in self.name
                                      or "\\" in self.name or self.name.startswith("~")):
            self.fail("name", f"must be a plain folder name (no '/', '..' or '~'), got {self.name!r}: runs live in "
                              f"run.output_dir/run.name; to write elsewhere set run.output_dir")


@dataclass
class TensorBoardSettings(Settings):
    """Rank-0 TensorBoard events of a run."""

    section: ClassVar[str] = "tensorboard"

    enabled: bool = setting(True, "Write scalars, attention panels, predictions and HParams.")


@dataclass
class RunSettings:
    """Every section of one run config, typed. Build it with :meth:`from_config`."""

    model: ModelSettings
    teacher: TeacherSettings
    data: DataSettings
    distill: DistillSettings
    lora: LoraSettings
    optim: OptimSettings
    trainer: TrainerSettings
    ray: RaySettings
    run: OutputSettings
    tensorboard: TensorBoardSettings

    @classmethod
    def from_config(cls, config: Mapping) -> "RunSettings":
        """Types a composed (or recorded) run config; missing sections and keys take their defaults.

        Raises:
            ConfigError: an unknown section or key, a wrong type or value, naming it.
        """
        if not isinstance(config, Mapping):
            raise ConfigError(f"a run config must be a mapping of sections, got {type(config).__name__}")
        unknown = sorted(set(config) - set(_SECTIONS))
        if unknown:
            raise ConfigError(f"unknown config section(s) {unknown}; valid sections: {list(_SECTIONS)}")
        return cls(**{name: section.from_dict(config.get(name)) for name, section in _SECTIONS.items()})

    def to_dict(self) -> dict:
        """The complete plain config (what workers receive and ``config.json`` records)."""
        return {name: getattr(self, name).to_dict() for name in _SECTIONS}

    @property
    def run_dir(self) -> Path:
        """``run.output_dir / run.name``, absolute (a local output_dir; see :attr:`run_location`)."""
        return Path(self.run.output_dir).expanduser().resolve() / str(self.run.name)

    @property
    def run_location(self) -> str:
        """``run.output_dir / run.name``: an absolute local path, or a URI when output_dir is one."""
        from .filesystems import join

        return join(self.run.output_dir, str(self.run.name))

    def check_paths(self) -> None:
        """Checks what the config points at on disk; the distillation layer against the model's depth.

        Reads ``config.json`` files only (no weights). Runs once per driver, before Ray starts.

        Raises:
            ConfigError: naming the key, the path or value, and the fix.
        """
        path = self.model.path
        local = Path(str(path)).expanduser()
        if not path or (str(path).startswith(("/", ".", "~")) and not (local / "config.json").is_file()):
            raise ConfigError(f"model.path={path!r} has no config.json; point it at a save_pretrained directory")
        depth = model_depth(str(path))
        check_layer(self.distill.layer, depth, str(path))
        bad_lora = [i for i in self.lora.layers_to_transform or [] if not 0 <= i < depth]
        if bad_lora:
            raise ConfigError(f"lora.layers_to_transform has {bad_lora}, outside 0..{depth - 1} ({path} has "
                              f"{depth} decoder layers)")
        for split in SPLITS:
            file = getattr(self.data, split)
            if not file or not Path(file).is_file():
                raise ConfigError(f"data.{split}={file!r} is not a file; run `medalign prepare data=...` or fix the path")
        for key in ("name", "cache_dir"):
            if not getattr(self.teacher, key):
                raise ConfigError(f"teacher.{key} is not set; choose a teacher preset (teacher=...) or set it")
        from ..core.teacher import HF_CLIP_PREFIX, LOCAL_DIR_PREFIX

        name = str(self.teacher.name)
        if name.startswith(HF_CLIP_PREFIX) and name[len(HF_CLIP_PREFIX):].startswith(("/", ".", "~")):
            folder = Path(name[len(HF_CLIP_PREFIX):]).expanduser()
            if not (folder / "config.json").is_file():
                raise ConfigError(f"teacher.name={name!r}: no config.json there; point it at a transformers CLIPModel "
                                  "folder (e.g. PubMedCLIP downloaded)")
        if name.startswith(LOCAL_DIR_PREFIX) and not (Path(name[len(LOCAL_DIR_PREFIX):]) / "open_clip_config.json").is_file():
            raise ConfigError(f"teacher.name={name!r}: no open_clip_config.json there; run `medalign prepare` "
                              "or point it at an open_clip local-dir export")
        if self.teacher.pretrained and not Path(self.teacher.pretrained).is_file():
            raise ConfigError(f"teacher.pretrained={self.teacher.pretrained!r} is not a file")


_SECTIONS: dict[str, type[Settings]] = {
    "model": ModelSettings, "teacher": TeacherSettings, "data": DataSettings, "distill": DistillSettings,
    "lora": LoraSettings, "optim": OptimSettings, "trainer": TrainerSettings, "ray": RaySettings,
    "run": OutputSettings, "tensorboard": TensorBoardSettings,
}


def defaults_tree() -> dict:
    """Every section with its default values: the base that the YAML groups are composed onto."""
    return {name: section().to_dict() for name, section in _SECTIONS.items()}


def settings_reference() -> str:
    """A Markdown table per section: key, type, default and help (``docs/settings.md``)."""
    lines = ["# Settings reference", "",
             "Every key of a run config, its type, its default and what it does, generated from the settings",
             "classes (`python -m medalign_platform.run.settings > docs/settings.md`). YAML presets in",
             "`experiments/` and `key=value` overrides set values on top of these defaults.", ""]
    for name, section in _SECTIONS.items():
        lines += [f"## `{name}`", "", section.__doc__.strip().splitlines()[0], "",
                  "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        for row in section.describe():
            default = "null" if row["default"] is None else row["default"]
            kind = row["type"].replace("|", "\\|")
            default = str(default).replace("True", "true").replace("False", "false").replace("None", "null")
            lines.append(f"| `{name}.{row['key']}` | `{kind}` | `{default}` | {row['help']} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(settings_reference(), end="")
