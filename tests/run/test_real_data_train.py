"""`medalign train experiment=vqa_rad_medalign data.source=<release>` end to end on a tiny student (Ray)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import NO_RAY_DASHBOARD
from release_fixtures import write_vqa_rad

pytestmark = pytest.mark.slow


def test_vqa_rad_preset_trains_on_the_release_folder_end_to_end(tmp_path, monkeypatch):
    import ray

    from medalign_platform.cli import main
    from medalign_platform import tiny_student, tiny_teacher

    monkeypatch.setenv("MEDALIGN_CACHE", str(tmp_path / "cache"))
    source = write_vqa_rad(tmp_path / "VQA_RAD")
    student = tiny_student(tmp_path / "student", image_size=32, patch_size=4)
    teacher = tiny_teacher(tmp_path / "teacher", image_size=64, patch_size=16)
    overrides = [
        "experiment=vqa_rad_medalign", f"data.source={source}",
        # the 7B student, teacher and 4-GPU layout swapped for tiny CPU ones; everything else is the preset's
        f"model.path={student}", f"teacher.name=local-dir:{teacher}", "distill.layer=2", "lora.rank=4",
        "trainer.max_steps=3", "trainer.batch_size=2", "trainer.grad_accum=1", "trainer.precision=fp32",
        "trainer.eval_every=0", "trainer.max_new_tokens=4", "ray.num_workers=1", "ray.use_gpu=false",
        "ray.resources_per_worker.CPU=1", f"run.output_dir={tmp_path / 'runs'}", "run.name=vqa_rad",
        NO_RAY_DASHBOARD,
    ]
    try:
        assert main(["train", *overrides]) == 0
    finally:
        ray.shutdown()
    run = tmp_path / "runs" / "vqa_rad"
    config = json.loads((run / "config.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    train_file = Path(config["data"]["train"])
    assert train_file.parent.parent == tmp_path / "cache" / "datasets" / "vqa_rad"
    prepared = json.loads((train_file.parent / "manifest.json").read_text())
    assert config["data"]["source"] == str(source) and prepared["layout"] == "osf_json"
    assert (config["distill"]["lambda_attn"], config["distill"]["attention_normalize"]) == (0.06, "l2")
    assert config["distill"]["steer"]["mode"] == "full" and config["trainer"]["seed"] == 4
    metrics = summary["metrics"]
    assert metrics["step"] == 3
    for key in ("train/loss", "train/spatial", "train/attention", "test/closed_accuracy",
                "test/closed_accuracy_substring", "test/open_recall", "test/open_f1"):
        assert math.isfinite(metrics[key]), key
    assert metrics["test/n_closed"] == 2 and metrics["test/n_open"] == 1            # the 3 test_* questions
    assert metrics["test/by_qtype/pos/n_open"] == 1 and metrics["test/by_qtype/pres/n_closed"] == 1
    assert summary["target_cache"]["test"]["images"] == 2                           # synpic1 and synpic5
