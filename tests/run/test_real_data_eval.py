"""Evaluation on a prepared real release: SLAKE's real masks give the grounding score."""

from __future__ import annotations

import math

import torch
from release_fixtures import write_slake

from medalign_platform.core.student import load_student
from medalign_platform.core.tap import DistillationTap
from medalign_platform.data.metrics import grounding_score, mean_grounding_score
from medalign_platform.data.prepare import prepare_dataset
from medalign_platform.data.settings import DataSettings
from medalign_platform.data.splits import evaluation_items, load_split
from medalign_platform.run.evaluation import evaluate_items


def test_slake_masks_drive_the_grounding_score_and_breakdowns(tiny_student_dir, tmp_path):
    prepared = prepare_dataset(DataSettings(name="slake", source=str(write_slake(tmp_path / "slake")),
                                                   cache_dir=str(tmp_path / "cache")))
    data = {"train": prepared.value("train"), "val": prepared.value("val"), "test": prepared.value("test"),
            "image_root": prepared.value("image_root"), "validate_images": False}
    items = evaluation_items(load_split(data, "test"), 0)
    assert all(item["mask"] is not None and item["mask"].any() for item in items)
    model, processor = load_student(tiny_student_dir)
    tap = DistillationTap(model, 2)
    seen = {}

    def keep(items_, predictions, attention):
        seen.update(items=items_, attention=attention)

    metrics = evaluate_items(model, processor, tap, items, batch_size=2, max_new_tokens=3, on_predictions=keep)
    expected = mean_grounding_score([grounding_score(row, torch.as_tensor(item["mask"]), tap.grid)
                                     for item, row in zip(seen["items"], seen["attention"])])
    assert math.isfinite(metrics["grounding"]) and metrics["grounding"] == expected
    assert metrics["n_closed"] == 1 and metrics["n_open"] == 1
    assert {"by_qtype/quantity/n_open", "by_qtype/position/n_closed", "closed_accuracy_substring"} <= set(metrics)
    tap.remove()
