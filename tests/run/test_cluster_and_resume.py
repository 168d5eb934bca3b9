"""On a real local Ray cluster: `ray.address: null` starts one of our own whatever a stale
`ray_current_cluster` says; resources no node can offer are refused before launch; an existing
run folder is refused, and `resume=true` continues the run without repeating a step."""

from __future__ import annotations

import json
import socket
import tempfile
import time
from pathlib import Path

import pytest

from medalign_platform.cli import main

pytestmark = pytest.mark.slow

STEPS = ["experiment=synthmed_vqa", "trainer.max_steps=4", "trainer.eval_every=2", "trainer.val_size=4",
         "trainer.test_size=4", "trainer.batch_size=4", "trainer.max_new_tokens=2", "trainer.log_every=1"]


def _dead_address() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


@pytest.fixture(scope="module")
def stale_cluster_env(tmp_path_factory):
    """Mini SynthMed, no RAY_ADDRESS, and a Ray temp dir whose ``ray_current_cluster`` names a
    cluster that is gone (what `ray start --block` stopped with SIGTERM leaves behind)."""
    from synthmed_fixtures import mini_synthmed_env

    root = tmp_path_factory.mktemp("cluster")
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths have a length limit
    (ray_tmp / "ray").mkdir()
    stale = _dead_address()
    (ray_tmp / "ray" / "ray_current_cluster").write_text(stale)
    patch = pytest.MonkeyPatch()
    patch.delenv("RAY_ADDRESS", raising=False)
    patch.setenv("RAY_TMPDIR", str(ray_tmp))
    try:
        # Ray workers get MEDALIGN_* variables when the cluster starts: the first run's worker
        # dies after step 3 (later runs find the marker and are left alone).
        with mini_synthmed_env(root / "cache", MEDALIGN_TEST_KILL=f"0:3:{root / 'killed'}"):
            yield root, stale
    finally:
        patch.undo()


@pytest.mark.timeout(600)
def test_null_address_starts_a_local_cluster_and_impossible_resources_are_refused_before_launch(
        stale_cluster_env, capsys):
    import ray

    root, stale = stale_cluster_env
    started = time.monotonic()
    status = main(["sweep", *STEPS, "search=smoke", "sweep.num_samples=1", f"sweep.output_dir={root / 'sweeps'}",
                   "sweep.name=gpu", "sweep.trial_resources={CPU: 1, GPU: 1}"])
    err = capsys.readouterr().err
    assert status == 2, err
    assert ray.is_initialized() and stale not in ray.get_runtime_context().gcs_address  # a cluster of our own
    line = err.strip().splitlines()[-1]
    assert line.startswith("medalign sweep: sweep.trial_resources={'CPU': 1.0, 'GPU': 1.0} x 1 worker(s) can never "
                           "be scheduled") and "this cluster has no GPU" in line
    assert not list((root / "sweeps" / "gpu").glob("trial_*"))  # refused before any trial started
    assert time.monotonic() - started < 300  # not a wait for resources that never come
    assert main(["train", *STEPS, "ray.use_gpu=true", f"run.output_dir={root / 'runs'}", "run.name=gpu"]) == 2
    assert "ray.resources_per_worker={'CPU': 1.0, 'GPU': 1.0}" in capsys.readouterr().err
    assert not (root / "runs" / "gpu" / "config.json").exists()


def test_an_existing_run_is_refused_and_resume_continues_it_without_repeating_steps(stale_cluster_env, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, _ = stale_cluster_env
    marker = root / "killed"
    run = ["train", *STEPS, f"run.output_dir={root / 'runs'}", "run.name=r", "ray.max_failures=0"]
    assert not marker.exists()
    assert main(run) == 1  # the worker dies after step 3 and is not restarted
    assert marker.is_file()
    capsys.readouterr()
    assert main(run) == 2
    assert "already holds a run (run.name='r'); pass resume=true" in capsys.readouterr().err
    assert main([*run, "resume=true"]) == 0
    summary = json.loads((root / "runs" / "r" / "summary.json").read_text())
    assert summary["metrics"]["step"] == 4 and summary["metrics"]["perf/start_step"] == 2
    events = EventAccumulator(str(root / "runs" / "r" / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("val/closed_accuracy")] == [2, 4]
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]  # step 3 of the dead run is hidden
