"""DataLoader workers inside a Ray Train worker and an inline Tune trial, sized by their Ray CPUs."""

from __future__ import annotations

import json
import math

import pytest
from conftest import NO_RAY_DASHBOARD
from synthmed_fixtures import mini_synthmed_env

pytestmark = pytest.mark.slow

STEPS = ["experiment=synthmed_vqa", "trainer.max_steps=4", "trainer.eval_every=2", "trainer.batch_size=4",
         "trainer.val_size=4", "trainer.test_size=4", "trainer.log_every=1", "trainer.max_new_tokens=2",
         "lora.rank=4", "distill.lambda_attn=0.5", NO_RAY_DASHBOARD]


@pytest.fixture(scope="module")
def local_cluster(tmp_path_factory):
    """One mini SynthMed and one local cluster (started by the first run) for both tests."""
    root = tmp_path_factory.mktemp("pipeline_in_ray")
    with mini_synthmed_env(root / "cache"):
        yield root


def _cluster_processes() -> list[str]:
    """Process names of the local cluster this process started (its child processes)."""
    import psutil

    return [p.name() for p in psutil.Process().children(recursive=True) if p.is_running()]


def test_a_ray_train_worker_with_two_cpus_reads_with_one_loader_process(local_cluster):
    from medalign_platform.cli import main

    overrides = [*STEPS, "trainer.data_workers=3", "ray.resources_per_worker={CPU: 2}",
                 f"run.output_dir={local_cluster / 'runs'}", "run.name=loader"]
    assert main(["train", *overrides]) == 0
    metrics = json.loads((local_cluster / "runs" / "loader" / "summary.json").read_text())["metrics"]
    assert metrics["step"] == 4 and metrics["perf/data_workers"] == 1  # 3 requested, 2 CPUs held: 1
    assert math.isfinite(metrics["train/attention"]) and "test/closed_accuracy" in metrics
    # ray.include_dashboard=false: the cluster the run started serves no dashboard (Ray keeps only its
    # minimal head and the node agent), so none of the dashboard's module processes (9 of them) runs.
    processes = _cluster_processes()
    assert "gcs_server" in processes and "raylet" in processes, processes
    assert not [p for p in processes if p.startswith("ray-dashboard-")], processes


def test_an_inline_trial_sizes_its_loader_by_its_trial_resources(local_cluster):
    from medalign_platform.tune.driver import run_sweep

    overrides = [*STEPS, "search=smoke", "sweep.num_samples=1", "sweep.name=loader", "trainer.data_workers=3",
                 "sweep.trial_resources={CPU: 2}", f"sweep.output_dir={local_cluster / 'sweeps'}"]
    summary = run_sweep(overrides)  # on the cluster the first test started, or a new one when run alone
    assert summary["trials"] == {"TERMINATED": 1}
    (trial,) = (local_cluster / "sweeps" / "loader").glob("trial_*")
    record = json.loads((trial / "final.json").read_text())
    assert record["metrics"]["step"] == 4 and record["metrics"]["perf/data_workers"] == 1
    spec = json.loads((local_cluster / "sweeps" / "loader" / "sweep.json").read_text())
    assert spec["settings"]["executor"] == "inline"  # a 1-worker CPU trial runs inline under sweep.executor=auto
