"""``medalign prepare data=synthmed``: build the embedded default once, reuse it afterwards.

Three stages, each cached under ``<cache_dir>/synthmed/<stage>-<fingerprint>/``:

1. ``data``    the SynthMed images, masks and LLaVA-format JSON (``synthmed.py``);
2. ``teacher`` the tiny expert CLIP, trained contrastively on it (``expert_clip.py``);
3. ``student`` the tiny base LVLM, pre-trained on it (``base_lvlm.py``).

A stage's fingerprint hashes its recipe version, its parameters and the fingerprints of
the stages it reads, so changing the generator (``SYNTHMED_VERSION``) rebuilds everything
downstream while an unchanged recipe is never rebuilt. A stage is written into a
temporary directory and renamed into place only when complete, so an interrupted prepare
leaves nothing half-built behind.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

from ..common.settings import Settings, setting

# The stage cache moved to common/ so the real-data adapters share it; re-exported here.
from ..common.stage_cache import DEFAULT_CACHE_ENV, cached_stage, default_cache_dir  # noqa: F401
from ..common.stage_cache import fingerprint as _fingerprint  # noqa: F401


@dataclass
class SynthMedPrepareSettings(Settings):
    """What ``medalign prepare data=synthmed`` builds (its ``key=value`` options)."""

    section: ClassVar[str] = ""

    seed: int = setting(0, "Seeds the generator, the expert CLIP and the base LVLM.")
    n_train: int = setting(5000, "Train images.", ge=1)
    n_val: int = setting(500, "Val images.", ge=1)
    n_test: int = setting(500, "Test images.", ge=1)
    cache_dir: str | None = setting(None, "Cache folder (default: $MEDALIGN_CACHE, else ~/.cache/medalign).")
    progress: bool = setting(True, "Show progress bars.")


@dataclass
class PreparedSynthMed:
    """Paths of the three prepared stages and the teacher's quality figures."""

    data_dir: Path
    teacher_dir: Path
    student_dir: Path
    teacher_metrics: dict
    student_metrics: dict


# Bump when the expert CLIP recipe in expert_clip.py changes its output.
EXPERT_CLIP_RECIPE = 1
RECORD_FILE = "prepared.json"


def synthmed_root(cache_dir: str | None = None) -> Path:
    """``<cache_dir>/synthmed``; ``cache_dir`` defaults to :func:`default_cache_dir`."""
    return (Path(cache_dir).expanduser() if cache_dir else default_cache_dir()) / "synthmed"


def prepare_synthmed(settings: SynthMedPrepareSettings) -> PreparedSynthMed:
    """Builds (or reuses) SynthMed data, the tiny expert CLIP and the tiny base LVLM.

    Prints the teacher's held-out R@1 and attention lift and writes every figure to
    ``<root>/prepared.json``, which ``${synthmed:...}`` config values read.
    """
    from .base_lvlm import BASE_LVLM_VERSION, pretrain_base_lvlm
    from .expert_clip import evaluate_expert_clip, train_expert_clip
    from .generator import SYNTHMED_VERSION, generate_synthmed

    root = synthmed_root(settings.cache_dir)
    sizes = {"n_train": settings.n_train, "n_val": settings.n_val, "n_test": settings.n_test}
    data_recipe = {"version": SYNTHMED_VERSION, "seed": settings.seed, **sizes}

    def build_data(out: Path) -> dict:
        manifest = generate_synthmed(out / "data", seed=settings.seed, progress=settings.progress, **sizes)
        return {"tree_sha256": manifest.get("tree_sha256")}

    data_stage, data_info = cached_stage(root, "data", data_recipe, build_data)
    data_dir = data_stage / "data"
    upstream = {"data": data_stage.name}

    def build_teacher(out: Path) -> dict:
        train_expert_clip(data_dir, out / "model", seed=settings.seed, progress=settings.progress)
        return evaluate_expert_clip(out / "model", data_dir)

    teacher_stage, teacher_info = cached_stage(
        root, "teacher", {"recipe": EXPERT_CLIP_RECIPE, "seed": settings.seed, **upstream}, build_teacher
    )

    def build_student(out: Path) -> dict:
        pretrain_base_lvlm(data_dir, out / "model", seed=settings.seed, progress=settings.progress)
        return json.loads((out / "model" / "training.json").read_text()).get("val", {})

    student_stage, student_info = cached_stage(
        root, "student", {"recipe": BASE_LVLM_VERSION, "seed": settings.seed, **upstream}, build_student
    )
    prepared = PreparedSynthMed(
        data_dir=data_dir,
        teacher_dir=teacher_stage / "model",
        student_dir=student_stage / "model",
        teacher_metrics=teacher_info["summary"],
        student_metrics=student_info["summary"],
    )
    record = {
        "data": str(prepared.data_dir),
        "teacher": str(prepared.teacher_dir),
        "student": str(prepared.student_dir),
        "cache": str(root),
        "teacher_metrics": prepared.teacher_metrics,
        "student_metrics": prepared.student_metrics,
        "settings": asdict(settings),
        "seconds": {"data": data_info["seconds"], "teacher": teacher_info["seconds"], "student": student_info["seconds"]},
    }
    (root / RECORD_FILE).write_text(json.dumps(record, indent=2, sort_keys=True))
    return prepared


def prepared_synthmed_record(cache_dir: str | None = None) -> dict:
    """The paths written by the last ``medalign prepare data=synthmed`` (for config values)."""
    path = synthmed_root(cache_dir) / RECORD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"SynthMed is not prepared ({path} missing): run `medalign prepare data=synthmed` first")
    return json.loads(path.read_text())


def prepared_path(key: str) -> str:
    """``${synthmed:KEY}`` in configs: a path (``data``, ``teacher``, ``student``, ``cache``) of the
    SynthMed that ``medalign prepare data=synthmed`` last built under ``$MEDALIGN_CACHE``."""
    return str(prepared_synthmed_record()[key])


def prepare_mini_synthmed(cache_dir: str | Path, *, n_train: int = 48, n_val: int = 12, n_test: int = 12) -> dict:
    """A miniature prepared SynthMed in ``cache_dir``: small data and tiny *untrained* models.

    For pipeline tests, benchmarks of Ray overhead and job-submission checks, which need
    the same files in the same places as ``medalign prepare`` but not trained models. It
    writes the same ``prepared.json`` record, so ``MEDALIGN_CACHE=cache_dir`` makes every
    ``${synthmed:...}`` config point at it. Takes a few seconds.

    Returns:
        the record: ``data``, ``teacher``, ``student`` and ``cache`` paths.
    """
    from .base_lvlm import base_lvlm_words
    from .generator import generate_synthmed
    from .tiny_student import tiny_student
    from .tiny_teacher import tiny_teacher

    root = synthmed_root(str(cache_dir))
    root.mkdir(parents=True, exist_ok=True)
    data = root / "data"
    generate_synthmed(data, seed=0, n_train=n_train, n_val=n_val, n_test=n_test, workers=1, progress=False)
    # Teacher grid 4x4 (64 px / 16) vs student grid 8x8: targets are resized, as with real models.
    teacher = tiny_teacher(root / "teacher", image_size=64, patch_size=16)
    student = tiny_student(root / "student", words=base_lvlm_words(), image_size=32, patch_size=4)
    record = {"data": str(data), "teacher": str(teacher), "student": str(student), "cache": str(root),
              "teacher_metrics": {}, "student_metrics": {}}
    (root / RECORD_FILE).write_text(json.dumps(record))
    return record
