"""MedAlign platform: alignment distillation of medical LVLMs, with sweeps on Ray.

The main API is importable from the package itself (imported lazily, so ``import
medalign_platform`` and the CLI stay fast)::

    from medalign_platform import load_student, apply_lora, LoraSettings, DistillSettings, MedAlignObjective

Sub-packages, dependencies pointing one way (``docs/architecture.md``)::

    common  <- core  <- data  <- run  <- synthmed, tune  <- cli
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_API = {
    # The method (core/)
    "spatial_alignment_loss": "core.losses", "attention_distillation_loss": "core.losses",
    "teacher_similarity": "core.losses", "teacher_attention_map": "core.losses",
    "ExpertTeacher": "core.teacher", "TeacherOutputs": "core.teacher", "load_teacher": "core.teacher",
    "TargetCache": "core.target_cache",
    "load_student": "core.student", "apply_lora": "core.student", "LoraSettings": "core.student",
    "SteerSettings": "core.student", "DistillationTap": "core.tap",
    "DistillSettings": "core.objective", "MedAlignObjective": "core.objective", "LOSS_TERMS": "core.objective",
    # Data (data/)
    "load_conversation_dataset": "data.conversations", "StudentCollator": "data.collate",
    "generate_answers": "data.collate", "vqa_metrics": "data.metrics",
    # Runs (run/)
    "compose_config": "run.compose", "RunSettings": "run.settings", "run_training": "run.loop",
    "RunContext": "run.loop", "train_run": "run.driver", "load_exported": "run.export",
    # Sweeps (tune/)
    "run_sweep": "tune.driver", "write_results": "tune.results", "run_ablation": "tune.ablation",
    # Tiny random checkpoints for tests and laptops (synthmed/)
    "tiny_student": "synthmed.tiny_student", "tiny_teacher": "synthmed.tiny_teacher",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'medalign_platform' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
