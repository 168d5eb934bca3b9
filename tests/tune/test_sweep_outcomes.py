"""A sweep whose trial errors: exit status 1 with the restart command, a quiet console, and
``resume=true sweep.restart_errored=true`` really restarting the trial from scratch."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SWEEP = ["experiment=synthmed_vqa", "search=smoke", "trainer.max_steps=6", "trainer.eval_every=2",
         "trainer.val_size=4", "trainer.test_size=4", "trainer.batch_size=4", "trainer.max_new_tokens=2",
         "trainer.log_every=1", "sweep.num_samples=1", "sweep.seed=0", "ray.max_failures=0", "sweep.name=err"]
NOISE = ("Checkpoint successfully created", "FutureWarning", "Loading weights", "Tuner.restore", "Trial status:",
         "_sweep/executor", "Trial task failed", "tensorboard --logdir /tmp", "Configuration for experiment")


def _sweep(overrides: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medalign_platform", "sweep", *overrides], env=env,
                          capture_output=True, text=True, timeout=900)


def _leaderboard_statuses(experiment: Path) -> dict:
    rows = csv.DictReader((experiment / "results" / "leaderboard.csv").read_text().splitlines())
    return {row["trial_id"]: row["status"] for row in rows}


@pytest.fixture(scope="module")
def errored_then_restarted(tmp_path_factory):
    """Run 1: the only trial's process is SIGKILLed after step 3 with ray.max_failures=0, so the
    trial errors. Run 2: ``resume=true sweep.restart_errored=true`` (no fault)."""
    from synthmed_fixtures import mini_synthmed_env

    root = tmp_path_factory.mktemp("errored")
    marker = root / "killed"
    overrides = [*SWEEP, f"sweep.output_dir={root / 'sweeps'}"]
    experiment = root / "sweeps" / "err"
    with mini_synthmed_env(root / "cache"):
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        first = _sweep(overrides, {**env, "MEDALIGN_TEST_KILL": f"0:3:{marker}"})
        after_first = {
            "summary": json.loads((experiment / "summary.json").read_text()),
            "leaderboard": _leaderboard_statuses(experiment),
            "folders": {p.name: sorted(c.name for c in p.iterdir()) for p in experiment.glob("trial_*")},
        }
        second = _sweep([*overrides, "resume=true", "sweep.restart_errored=true"], env)
    return first, after_first, second, experiment, marker


def test_an_errored_sweep_exits_1_and_prints_the_restart_command(errored_then_restarted):
    first, after, _, experiment, marker = errored_then_restarted
    assert marker.is_file(), first.stderr  # the trial process really died
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
    first, after, second, experiment, _ = errored_then_restarted
    console = first.stdout + first.stderr
    for noise in NOISE:
        assert noise not in console, noise
    err = first.stderr.splitlines()
    assert len(err) <= 20, first.stderr  # Tune printed ~120 lines for the same one-trial sweep
    assert any(" started " in line and "lambda_align=1 layer=2 rank=4" in line for line in err)
    assert any("step 2/6  val/closed_accuracy=" in line for line in err)
    assert any(" ERROR " in line and "error.txt" in line for line in err)
    assert f"trial output in {experiment}/trial_<id>/trial.log; driver log {experiment}/driver.log" in first.stderr
    (trial_id,) = after["leaderboard"]
    trial_log = (experiment / f"trial_{trial_id}" / ".restarted-")  # run 2 set the errored attempt aside
    (aside,) = experiment.joinpath(f"trial_{trial_id}").glob(".restarted-*")
    log = (aside / "trial.log").read_text()
    assert "Checkpoint successfully created" in log and "Loading weights" in log, trial_log
    assert "A new study created" in (experiment / "driver.log").read_text()
    # TensorBoard on the sweep folder: the trial's own events only (Tune's logger is off).
    assert not [name for name in after["folders"][f"trial_{trial_id}"] if name.startswith("events.out")]
    assert "tensorboard" in after["folders"][f"trial_{trial_id}"]
    assert second.returncode == 0 and "Checkpoint successfully created" not in second.stderr


def test_restart_errored_starts_the_trial_from_scratch_and_the_study_records_it(errored_then_restarted):
    import optuna

    first, after, second, experiment, _ = errored_then_restarted
    assert second.returncode == 0, second.stderr
    assert second.stderr.strip().splitlines()[-1] == "medalign sweep: 1 of 1 trials finished"
    summary = json.loads((experiment / "summary.json").read_text())
    assert summary["trials"] == {"TERMINATED": 1}
    (record,) = summary["records"]
    (errored_id,) = after["leaderboard"]
    folder = Path(record["path"])
    rows = [json.loads(line) for line in (folder / "result.json").read_text().splitlines()]
    assert [row["step"] for row in rows] == [2, 4, 6] and {row["perf/start_step"] for row in rows} == {0}
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
