"""A miniature prepared SynthMed (small data, tiny random models) for run/sweep tests.

The real ``medalign prepare`` trains its models for minutes; pipeline tests only need
the same files in the same places, so this builds them with the same builders at toy
scale and writes the ``prepared.json`` record that ``${synthmed:...}`` configs read.
"""

from __future__ import annotations

import json
from pathlib import Path


def build_mini_synthmed(cache_dir: Path, *, n_train: int = 48, n_val: int = 12, n_test: int = 12) -> dict:
    from medalign_platform.base_lvlm import base_lvlm_words
    from medalign_platform.prepare import RECORD_FILE, synthmed_root
    from medalign_platform.synthmed import generate_synthmed
    from medalign_platform.tiny_student import tiny_student
    from medalign_platform.tiny_teacher import tiny_teacher

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
