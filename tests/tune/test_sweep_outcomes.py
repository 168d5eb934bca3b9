"""Faults and outcomes on one real local Ray cluster, shared by every test of this module (a
cluster start costs more than most of what is checked here).

* ``ray.address: null`` starts a cluster of our own whatever a stale ``ray_current_cluster``
  names; resources no node can offer are refused before launch (sweep and train).
* A sweep whose trial errors exits 1 with the restart command, shows one quiet progress view
  (the trial's chatter in its ``trial.log``), and ``resume=true sweep.restart_errored=true``
  restarts the trial from scratch, recorded in the study. The errored run is a driver
  process of its own (its console is what a user sees), with its own local cluster: the
  clusters medalign starts listen on loopback only, and a second driver on this machine
  cannot join one through ``RAY_ADDRESS`` (its ``ray.init`` waits for a raylet on the
  machine's outward address).
* ``medalign train`` refuses an existing run folder; ``resume=true`` continues it without
  repeating a step in TensorBoard.

Faults come from ``MEDALIGN_TEST_KILL=0:3:<marker>`` (rank 0 SIGKILLs itself after step 3
unless the marker exists): it is fixed when the cluster starts, so the marker is created up
front and a test removes it to arm the next kill.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import NO_RAY_DASHBOARD

from medalign_platform.cli import main

pytestmark = pytest.mark.slow

STEPS = ["experiment=synthmed_vqa", "trainer.max_steps=4", "trainer.eval_every=2", "trainer.val_size=4",
         "trainer.test_size=4", "trainer.batch_size=4", "trainer.max_new_tokens=2", "trainer.log_every=1",
         NO_RAY_DASHBOARD]
ERR_SWEEP = [*STEPS, "search=smoke", "sweep.num_samples=1", "sweep.seed=0", "ray.max_failures=0", "sweep.name=err"]
NOISE = ("Checkpoint successfully created", "FutureWarning", "Loading weights", "Tuner.restore", "Trial status:",
         "_sweep/executor", "Trial task failed", "tensorboard --logdir /tmp", "Configuration for experiment")


def _dead_address() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


@pytest.fixture(scope="module")
def cluster_env(tmp_path_factory):
    """Mini SynthMed, no RAY_ADDRESS, a Ray temp dir whose ``ray_current_cluster`` names a cluster
    that is gone (what `ray start --block` stopped with SIGTERM leaves behind), and the kill hook
    disarmed. Yields ``(root, stale address, kill marker)``; Ray is shut down at the end."""
    from synthmed_fixtures import mini_synthmed_env

    root = tmp_path_factory.mktemp("cluster")
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths have a length limit
    (ray_tmp / "ray").mkdir()
    stale = _dead_address()
    (ray_tmp / "ray" / "ray_current_cluster").write_text(stale)
    marker = root / "killed"
    marker.write_text("disarmed")
    patch = pytest.MonkeyPatch()
    patch.delenv("RAY_ADDRESS", raising=False)
    patch.setenv("RAY_TMPDIR", str(ray_tmp))
    try:
        with mini_synthmed_env(root / "cache", MEDALIGN_TEST_KILL=f"0:3:{marker}"):
            yield root, stale, marker
    finally:
        patch.undo()


def _gcs_address(cluster_env) -> str:
    """This module's cluster (started quiet, as a sweep starts it, when no test has yet)."""
    import ray

    if not ray.is_initialized():
        from medalign_platform.run.driver import ensure_ray, resolve_run_settings

        ensure_ray(resolve_run_settings(STEPS), quiet=True)
    return ray.get_runtime_context().gcs_address


@pytest.mark.timeout(600)
def test_null_address_starts_a_local_cluster_and_impossible_resources_are_refused_before_launch(
        cluster_env, capsys):
    import ray

    root, stale, _ = cluster_env
    started = time.monotonic()
    status = main(["sweep", *STEPS, "search=smoke", "sweep.num_samples=1", f"sweep.output_dir={root / 'sweeps'}",
                   "sweep.name=gpu", "sweep.trial_resources={CPU: 1, GPU: 1}",
                   "sweep.asha.enabled=false"])  # GPU trials run on Ray Train: ASHA would need Ray's dashboard
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


def _leaderboard_statuses(experiment: Path) -> dict:
    rows = csv.DictReader((experiment / "results" / "leaderboard.csv").read_text().splitlines())
    return {row["trial_id"]: row["status"] for row in rows}


@pytest.fixture(scope="module")
def errored_then_restarted(cluster_env):
    """Run 1, a driver process of its own (its console is what a user sees): the only trial's
    process is SIGKILLed after step 3 with ray.max_failures=0, so the trial errors. Run 2, in
    this process, on this module's cluster: ``resume=true sweep.restart_errored=true``."""
    root, _, marker = cluster_env
    overrides = [*ERR_SWEEP, f"sweep.output_dir={root / 'sweeps'}"]
    experiment = root / "sweeps" / "err"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    marker.unlink()  # arm the kill
    first = subprocess.run([sys.executable, "-m", "medalign_platform", "sweep", *overrides], env=env,
                           capture_output=True, text=True, timeout=600)
    after_first = {
        "killed": marker.read_text() != "disarmed",
        "summary": json.loads((experiment / "summary.json").read_text()),
        "leaderboard": _leaderboard_statuses(experiment),
        "folders": {p.name: sorted(c.name for c in p.iterdir()) for p in experiment.glob("trial_*")},
    }
    second = main(["sweep", *overrides, "resume=true", "sweep.restart_errored=true"])
    return first, after_first, second, experiment


def test_an_errored_sweep_exits_1_and_prints_the_restart_command(errored_then_restarted):
    first, after, _, experiment = errored_then_restarted
    assert after["killed"], first.stderr  # the trial process really died
    assert first.returncode == 1, first.stderr
    (trial_id,) = after["leaderboard"]
    assert after["summary"]["trials"] == {"ERROR": 1} and after["leaderboard"] == {trial_id: "ERROR"}
    lines = first.stderr.strip().splitlines()
    assert lines[-3].startswith(f"medalign sweep: 1 of 1 trials errored (trial_{trial_id}: ")
    assert str(experiment / f"trial_{trial_id}" / "error.txt") in lines[-3]
    assert lines[-2].strip().startswith("medalign sweep ") and lines[-2].strip().endswith(
        f"sweep.output_dir={experiment.parent} sweep.name=err resume=true sweep.restart_errored=true")
    assert "sweep.resume_errored=true" in lines[-1]


def test_the_console_shows_one_progress_view_and_keeps_the_chatter_in_log_files(errored_then_restarted):
    first, after, _, experiment = errored_then_restarted
    console = first.stdout + first.stderr
    for noise in NOISE:
        assert noise not in console, noise
    err = first.stderr.splitlines()
    assert len(err) <= 20, first.stderr  # Tune printed ~120 lines for the same one-trial sweep
    assert any(" started " in line and "lambda_align=1 layer=2 rank=4" in line for line in err)
    assert any("step 2/4  val/closed_accuracy=" in line for line in err)
    assert any(" ERROR " in line and "error.txt" in line for line in err)
    assert f"trial output in {experiment}/trial_<id>/trial.log; driver log {experiment}/driver.log" in first.stderr
    (trial_id,) = after["leaderboard"]
    (aside,) = experiment.joinpath(f"trial_{trial_id}").glob(".restarted-*")  # run 2 set the errored attempt aside
    log = (aside / "trial.log").read_text()
    assert "Checkpoint successfully created" in log and "Loading weights" in log, log
    assert "A new study created" in (experiment / "driver.log").read_text()
    # TensorBoard on the sweep folder: the trial's own events only (Tune's logger is off).
    assert not [name for name in after["folders"][f"trial_{trial_id}"] if name.startswith("events.out")]
    assert "tensorboard" in after["folders"][f"trial_{trial_id}"]


def test_restart_errored_starts_the_trial_from_scratch_and_the_study_records_it(errored_then_restarted):
    import optuna

    _, after, second, experiment = errored_then_restarted
    assert second == 0
    summary = json.loads((experiment / "summary.json").read_text())
    assert summary["trials"] == {"TERMINATED": 1}
    (record,) = summary["records"]
    (errored_id,) = after["leaderboard"]
    folder = Path(record["path"])
    rows = [json.loads(line) for line in (folder / "result.json").read_text().splitlines()]
    assert [row["step"] for row in rows] == [2, 4] and {row["perf/start_step"] for row in rows} == {0}
    # What the errored attempt left is kept aside, not resumed from.
    (aside,) = (experiment / f"trial_{errored_id}").glob(".restarted-*")
    assert (aside / "error.txt").is_file() and list(aside.glob("checkpoint_*"))
    study = optuna.load_study(study_name="err", storage=f"sqlite:///{experiment / 'optuna.db'}")
    states = {t.user_attrs.get("tune_trial_id"): t for t in study.trials}
    assert states[errored_id].state == optuna.trial.TrialState.FAIL
    restarted = states[record["trial_id"]]
    assert restarted.state == optuna.trial.TrialState.COMPLETE
    assert restarted.values == [record["metrics"]["val/closed_accuracy"]]
    assert restarted.params == states[errored_id].params  # the same point of the space, run again
    assert _leaderboard_statuses(experiment) == {record["trial_id"]: "TERMINATED"}


def test_an_existing_run_is_refused_and_resume_continues_it_without_repeating_steps(cluster_env, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, _, marker = cluster_env
    run = ["train", *STEPS, f"run.output_dir={root / 'runs'}", "run.name=r", "ray.max_failures=0"]
    _gcs_address(cluster_env)
    marker.unlink()  # arm the kill
    assert main(run) == 1  # the worker dies after step 3 and is not restarted
    assert marker.read_text() != "disarmed"
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
