"""Chaos: a 6-trial sweep interrupted by SIGTERM, then hit by an inline-trial kill, a worker kill
and a driver kill at seeded random points, resumed until done. Every trial completes once,
Optuna's study and the trial records agree, and no evaluation is missing or duplicated in any
trial's TensorBoard or result rows."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import NO_RAY_DASHBOARD
from ray_cluster import kill_tree

pytestmark = pytest.mark.slow

SEED = 13
MAX_STEPS, EVAL_EVERY, TRIALS = 6, 2, 6
EVAL_STEPS = list(range(EVAL_EVERY, MAX_STEPS + 1, EVAL_EVERY))
SWEEP = ["experiment=synthmed_vqa", "search=smoke", f"trainer.max_steps={MAX_STEPS}", f"trainer.eval_every={EVAL_EVERY}",
         "trainer.val_size=4", "trainer.test_size=4", "trainer.batch_size=4", "trainer.max_new_tokens=2",
         "trainer.log_every=1", f"sweep.num_samples={TRIALS}", "sweep.max_concurrent=2", "sweep.seed=0",
         "sweep.asha.enabled=false", "sweep.executor=inline", "sweep.name=chaos",
         # Room for every injected fault to land on one trial: Tune may count one killed trial
         # actor twice (its task and the actor itself fail).
         "ray.max_failures=4", NO_RAY_DASHBOARD]
PHASE_TIMEOUT_S = 600


def _rows(experiment: Path) -> dict[str, list[dict]]:
    """Every trial's result rows (``result.json``: one JSON line per evaluation the driver received)."""
    rows = {}
    for path in sorted(experiment.glob("trial_*/result.json")):
        rows[path.parent.name] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows


def _count(experiment: Path) -> int:
    try:
        return sum(len(r) for r in _rows(experiment).values())
    except (OSError, ValueError):  # a line being written
        return -1


def _start(overrides: list[str], env: dict, log: Path) -> subprocess.Popen:
    with log.open("a") as handle:
        handle.write(f"\n===== medalign sweep {' '.join(overrides[-2:])}\n")
    return subprocess.Popen([sys.executable, "-m", "medalign_platform", "sweep", *overrides], env=env,
                            stdout=log.open("a"), stderr=subprocess.STDOUT, start_new_session=True)


def _wait_rows(proc: subprocess.Popen, experiment: Path, at_least: int) -> bool:
    """Waits until the sweep has recorded ``at_least`` result rows (False: the driver ended first)."""
    deadline = time.monotonic() + PHASE_TIMEOUT_S
    while time.monotonic() < deadline:
        if _count(experiment) >= at_least:
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.2)
    raise TimeoutError(f"no {at_least} result rows in {PHASE_TIMEOUT_S} s")


def _trial_processes(proc: subprocess.Popen):
    import psutil

    found = []
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if any("ImplicitFunc" in part or "sweep_trial" in part for part in child.cmdline()):
                found.append(child)
        except psutil.Error:
            continue
    return found


@pytest.fixture(scope="module")
def chaos(tmp_path_factory):
    from medalign_platform.tune.results import write_results
    from synthmed_fixtures import mini_synthmed_env

    rng = random.Random(SEED)
    root = tmp_path_factory.mktemp("chaos")
    experiment = root / "sweeps" / "chaos"
    overrides = [*SWEEP, f"sweep.output_dir={root / 'sweeps'}"]
    log = root / "console.log"
    marker = root / "inline-kill"
    plan = {"sigterm_after": rng.randint(1, 3), "inline_kill_step": rng.choice([1, 3, 5]),
            "worker_kill_after": rng.randint(1, 3), "driver_kill_after": rng.randint(2, 4)}
    facts: dict = {"plan": plan, "snapshots": []}
    with mini_synthmed_env(root / "cache"):
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        # 1. SIGTERM (`ray job stop`, Ctrl-C): a graceful stop with the resume command.
        proc = _start(overrides, env, log)
        assert _wait_rows(proc, experiment, plan["sigterm_after"]), log.read_text()[-3000:]
        proc.send_signal(signal.SIGTERM)
        facts["sigterm_rc"] = proc.wait(timeout=PHASE_TIMEOUT_S)
        facts["sigterm_console"] = log.read_text()
        facts["interrupted_summary"] = json.loads((experiment / "summary.json").read_text())
        facts["interrupted_leaderboard"] = {row["trial_id"]: row["status"]
                                            for row in write_results(experiment)["leaderboard"]}
        facts["snapshots"].append(_rows(experiment))
        # 2. Resumed with an inline-trial kill armed, then a worker kill, then a driver kill.
        proc = _start([*overrides, "resume=true"], {**env, "MEDALIGN_TEST_KILL": f"0:{plan['inline_kill_step']}:{marker}"},
                      log)
        base = max(_count(experiment), 0)
        assert _wait_rows(proc, experiment, base + plan["worker_kill_after"]), log.read_text()[-3000:]
        victims = _trial_processes(proc)
        assert victims, "no trial process to kill"
        victim = rng.choice(victims)
        facts["worker_killed"] = victim.pid
        victim.kill()
        base = max(_count(experiment), 0)
        assert _wait_rows(proc, experiment, base + plan["driver_kill_after"]), log.read_text()[-3000:]
        kill_tree(proc)
        facts["snapshots"].append(_rows(experiment))
        # 3. Resumed until the sweep says it is complete.
        for attempt in range(3):
            proc = _start([*overrides, "resume=true"], env, log)
            facts["final_rc"] = proc.wait(timeout=PHASE_TIMEOUT_S * 2)
            if facts["final_rc"] == 0:
                break
        facts["inline_killed"] = marker.is_file()
        facts["console"] = log.read_text()
    return facts, experiment


def test_sigterm_stops_gracefully_with_exit_143_the_resume_command_and_agreeing_statuses(chaos):
    facts, experiment = chaos
    assert facts["sigterm_rc"] == 143, facts["sigterm_console"][-3000:]
    console = facts["sigterm_console"]
    assert "medalign sweep: interrupted by SIGTERM" in console and "Tuner.restore" not in console
    assert f"sweep.output_dir={experiment.parent} sweep.name=chaos resume=true" in console
    records = {r["trial_id"]: r["status"] for r in facts["interrupted_summary"]["records"]}
    assert records == facts["interrupted_leaderboard"]  # the summary and `medalign status` agree
    assert "INTERRUPTED" in records.values() and not {"RUNNING", "PENDING"} & set(records.values()) - {"PENDING"}


def test_every_fault_happened_and_the_sweep_completed(chaos):
    facts, experiment = chaos
    assert facts["inline_killed"] and facts["worker_killed"], facts["plan"]
    assert facts["final_rc"] == 0, facts["console"][-4000:]
    summary = json.loads((experiment / "summary.json").read_text())
    assert summary["trials"] == {"TERMINATED": TRIALS} and summary["num_trials"] == TRIALS
    for record in summary["records"]:
        final = json.loads((Path(record["path"]) / "final.json").read_text())
        assert final["metrics"]["step"] == MAX_STEPS and record["metrics"]["step"] == MAX_STEPS


def test_every_trial_completes_once_and_the_study_agrees_with_the_records(chaos):
    import optuna

    _, experiment = chaos
    records = {r["trial_id"]: r for r in json.loads((experiment / "summary.json").read_text())["records"]}
    study = optuna.load_study(study_name="chaos", storage=f"sqlite:///{experiment / 'optuna.db'}")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.user_attrs["tune_trial_id"] for t in complete) == sorted(records)  # each trial once
    for trial in complete:
        record = records[trial.user_attrs["tune_trial_id"]]
        assert trial.values == [record["metrics"]["val/closed_accuracy"]]
        assert {k.replace("/", "."): v for k, v in trial.params.items()} == {
            k: v for k, v in record["params"].items() if k != "lora.alpha"}
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]


def test_no_evaluation_is_missing_or_duplicated_in_tensorboard_or_the_result_rows(chaos):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    facts, experiment = chaos
    final_rows = _rows(experiment)
    assert len(final_rows) == TRIALS
    for name, rows in final_rows.items():
        assert [row["step"] for row in rows] == EVAL_STEPS, name
        for snapshot in facts["snapshots"]:  # append-only: what was recorded before a fault stays
            before = snapshot.get(name, [])
            assert rows[:len(before)] == before, name
        events = EventAccumulator(str(experiment / name / "tensorboard"), size_guidance={"scalars": 0})
        events.Reload()
        assert [e.step for e in events.Scalars("val/closed_accuracy")] == EVAL_STEPS, name
        assert [e.step for e in events.Scalars("train/loss")] == list(range(1, MAX_STEPS + 1)), name
