"""DataLoader workers inside a Ray Train worker and an inline Tune trial, sized by their Ray CPUs."""

from __future__ import annotations

import json
import math

import pytest
from synthmed_fixtures import mini_synthmed_env

pytestmark = pytest.mark.slow

STEPS = ["experiment=synthmed_vqa", "trainer.max_steps=4", "trainer.eval_every=2", "trainer.batch_size=4",
         "trainer.val_size=4", "trainer.test_size=4", "trainer.log_every=1", "trainer.max_new_tokens=2",
         "lora.rank=4", "distill.lambda_attn=0.5"]


def test_a_ray_train_worker_with_two_cpus_reads_with_one_loader_process(tmp_path):
    from medalign_platform.cli import main

    overrides = [*STEPS, "trainer.data_workers=3", "ray.resources_per_worker={CPU: 2}",
                 f"run.output_dir={tmp_path / 'runs'}", "run.name=loader"]
    with mini_synthmed_env(tmp_path / "cache"):
        assert main(["train", *overrides]) == 0
    metrics = json.loads((tmp_path / "runs" / "loader" / "summary.json").read_text())["metrics"]
    assert metrics["step"] == 4 and metrics["perf/data_workers"] == 1  # 3 requested, 2 CPUs held: 1
    assert math.isfinite(metrics["train/attention"]) and "test/closed_accuracy" in metrics


def test_an_inline_trial_sizes_its_loader_by_its_trial_resources(tmp_path):
    from medalign_platform.tune.driver import run_sweep

    overrides = [*STEPS, "search=smoke", "sweep.num_samples=1", "sweep.name=loader", "trainer.data_workers=3",
                 "sweep.trial_resources={CPU: 2}", f"sweep.output_dir={tmp_path / 'sweeps'}"]
    with mini_synthmed_env(tmp_path / "cache"):
        summary = run_sweep(overrides)
    assert summary["trials"] == {"TERMINATED": 1}
    (trial,) = (tmp_path / "sweeps" / "loader").glob("trial_*")
    record = json.loads((trial / "final.json").read_text())
    assert record["metrics"]["step"] == 4 and record["metrics"]["perf/data_workers"] == 1
    spec = json.loads((tmp_path / "sweeps" / "loader" / "sweep.json").read_text())
    assert spec["settings"]["executor"] == "inline"  # a 1-worker CPU trial runs inline under sweep.executor=auto
