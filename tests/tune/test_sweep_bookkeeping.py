"""The sweep's bookkeeping without Ray: exit statuses and resume commands, trial statuses that the
summary and the leaderboard share, append-only result rows, and the ablation's TensorBoard swap."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from medalign_platform.tune.outcome import resume_command, sweep_outcome

ARGS = ["experiment=synthmed_vqa", "search=smoke", "sweep.name=old", "resume=true", "sweep.restart_errored=false"]


def _summary(**trials) -> dict:
    return {"experiment_dir": "/data/sweeps/s1", "trials": trials, "num_trials": sum(trials.values()),
            "errored": [{"trial_id": "ab12", "error": "/data/sweeps/s1/trial_ab12/error.txt"}] if "ERROR" in trials
            else []}


@pytest.mark.parametrize("trials, interrupted, status, start", [
    ({"TERMINATED": 4}, None, 0, "4 of 4 trials finished"),
    ({"TERMINATED": 3, "ERROR": 1}, None, 1, "1 of 4 trials errored (trial_ab12: /data/sweeps/s1/trial_ab12/error.txt)"),
    ({"ERROR": 4}, None, 1, "4 of 4 trials errored"),
    ({"TERMINATED": 2, "INTERRUPTED": 1, "PENDING": 1}, None, 3, "partial: 2 of 4 trials finished"),
    ({"TERMINATED": 2}, None, 3, "partial: 2 of 4 trials finished"),  # trials never created
    ({"TERMINATED": 1, "INTERRUPTED": 2}, "SIGINT", 130, "interrupted by SIGINT with 1 of 4 trials finished"),
    ({"TERMINATED": 1, "INTERRUPTED": 2}, "SIGTERM", 143, "interrupted by SIGTERM"),
])
def test_a_sweep_exits_non_zero_unless_every_trial_finished(trials, interrupted, status, start):
    summary = {**_summary(**trials), "interrupted": interrupted}
    got, line = sweep_outcome(summary, 4, ARGS)
    assert got == status and line.startswith(start)
    if status:
        command = line.splitlines()[1].strip()
        assert command.startswith("medalign sweep experiment=synthmed_vqa search=smoke ")
        assert "sweep.output_dir=/data/sweeps sweep.name=s1 resume=true" in command  # the folder, spelled out
        assert ("sweep.restart_errored=true" in command) == (status == 1) and "Tuner.restore" not in line
        assert command.count("resume=") == 1 and "sweep.name=old" not in command


def test_an_ablation_s_resume_command_names_its_own_folder_keys():
    command = resume_command(["layers=[1,2]", "ablation.name=x"], "/d/sweeps/x", command="ablate-layers",
                             prefix="ablation")
    assert command == "medalign ablate-layers 'layers=[1,2]' ablation.output_dir=/d/sweeps ablation.name=x resume=true"


def _record(trial_id: str, status: str, step: int | None) -> dict:
    return {"trial_id": trial_id, "status": status, "metrics": {} if step is None else {"step": step}}


def test_trial_statuses_depend_on_whether_the_driver_runs_and_what_it_saw_error():
    from medalign_platform.tune.records import live_records

    records = [_record("a", "TERMINATED", 6), _record("b", "PENDING", 4), _record("c", "PENDING", None),
               _record("d", "RUNNING", 2), _record("e", "ERROR", 2)]
    status = lambda rows: [r["status"] for r in rows]  # noqa: E731
    assert status(live_records(records, running=True)) == ["TERMINATED", "RUNNING", "PENDING", "RUNNING", "ERROR"]
    stopped = live_records(records, running=False)
    assert status(stopped) == ["TERMINATED", "INTERRUPTED", "PENDING", "INTERRUPTED", "ERROR"]
    assert status(live_records(stopped, running=True)) == status(live_records(records, running=True))
    assert status(live_records(records, running=False, errored=["d"]))[3] == "ERROR"  # Tune's snapshot lagged


def test_driver_state_tells_a_running_driver_from_a_dead_or_finished_one(tmp_path):
    from medalign_platform.tune.layout import DRIVER_FILE, read_driver_state, sweep_running, write_driver_state

    assert not sweep_running(tmp_path)
    write_driver_state(tmp_path, "running")
    assert sweep_running(tmp_path) and read_driver_state(tmp_path)["pid"] == os.getpid()
    write_driver_state(tmp_path, "interrupted")
    assert not sweep_running(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    state = {**read_driver_state(tmp_path), "state": "running", "pid": int(dead.stdout)}  # a SIGKILLed driver
    (tmp_path / DRIVER_FILE).write_text(json.dumps(state))
    assert not sweep_running(tmp_path)


def _trial(folder: Path, trial_id: str = "t1"):
    folder.mkdir(parents=True, exist_ok=True)
    storage = SimpleNamespace(storage_filesystem=SimpleNamespace(type_name="local"))
    return SimpleNamespace(trial_id=trial_id, path=str(folder), local_path=str(folder), storage=storage,
                           config={"distill": {"layer": 2}, "_sweep": {"x": 1}})


def test_result_rows_are_appended_across_driver_restarts_never_rewritten_or_doubled(tmp_path):
    from medalign_platform.tune.result_log import PROGRESS_FILE, RESULT_FILE, TrialResultLog

    trial = _trial(tmp_path / "trial_t1")
    first = TrialResultLog()
    first.log_trial_start(trial)
    for step in (2, 4):
        first.log_trial_result(step // 2, trial, {"step": step, "val/closed_accuracy": step / 10, "config": {}})
    # The driver dies in the middle of writing the next row.
    with (tmp_path / "trial_t1" / RESULT_FILE).open("a") as handle:
        handle.write('{"step": 6, "val/clos')
    second = TrialResultLog()  # the resumed driver
    second.log_trial_start(trial)
    for step in (4, 6, 8):  # the trial resumed from its step-4 checkpoint reports step 4 again
        second.log_trial_result(step, trial, {"step": step, "val/closed_accuracy": step / 10})
    rows = [json.loads(line) for line in (tmp_path / "trial_t1" / RESULT_FILE).read_text().splitlines()]
    assert [(r["step"], r["val/closed_accuracy"]) for r in rows] == [(2, 0.2), (4, 0.4), (6, 0.6), (8, 0.8)]
    csv_lines = (tmp_path / "trial_t1" / PROGRESS_FILE).read_text().splitlines()
    assert csv_lines[0] == "step,val/closed_accuracy" and csv_lines[1:] == ["2,0.2", "4,0.4", "6,0.6", "8,0.8"]
    assert json.loads((tmp_path / "trial_t1" / "params.json").read_text()) == {"distill.layer": 2}


def test_the_ablation_tensorboard_is_built_beside_and_swapped_in(tmp_path):
    from medalign_platform.tune.ablation_report import aggregate, log_tensorboard, plot_ablation

    records = [{"trial_id": f"t{layer}", "status": "TERMINATED", "params": {"distill.layer": layer, "trainer.seed": 0},
                "metrics": {"step": 4, "val/closed_accuracy": layer / 10},
                "config": {"trainer": {"max_steps": 4}}} for layer in (1, 2)]
    result = aggregate(records, [1, 2], [0], "val/closed_accuracy")
    png = plot_ablation(result, tmp_path / "ablation.png")
    board = log_tensorboard(result, png, "| table |", tmp_path / "tensorboard")
    before = sorted(p.name for p in board.iterdir())
    with pytest.raises(FileNotFoundError):  # a rebuild that fails half-way (its plot is gone)
        log_tensorboard(result, tmp_path / "missing.png", "| table |", tmp_path / "tensorboard")
    assert sorted(p.name for p in board.iterdir()) == before  # the old folder is untouched
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no half-built sibling left
    log_tensorboard(result, png, "| table |", tmp_path / "tensorboard")
    assert len(list(board.iterdir())) == 1  # rebuilt from scratch: one event file, not two


def _progress_trial(trial_id: str, layer: int, status: str = "RUNNING"):
    return SimpleNamespace(trial_id=trial_id, status=status, path=f"/s/trial_{trial_id}",
                           config={"distill": {"layer": layer, "lambda_align": 0.25}, "lora": {"rank": 4, "alpha": 8},
                                   "trainer": {"max_steps": 6}, "_sweep": {"executor": "inline"}},
                           run_metadata=SimpleNamespace(num_failures=0))


def test_the_progress_view_shows_only_the_searched_values_the_best_so_far_and_where_the_logs_are():
    import io

    from medalign_platform.tune.progress import SweepProgress

    stream = io.StringIO()
    view = SweepProgress(name="s1", experiment_dir="/s", params=["distill.layer", "distill.lambda_align", "lora.rank"],
                         metric="val/closed_accuracy", mode="max", num_samples=3, max_concurrent=2, max_steps=6,
                         early_stopping="off", stream=stream, status_every_s=0.0)
    a, b = _progress_trial("aa", 2), _progress_trial("bb", 3)
    view.setup()
    view.on_trial_start(0, [a, b], a)
    view.on_trial_result(1, [a, b], a, {"step": 2, "val/closed_accuracy": 0.5, "config": {}})
    view.on_trial_result(2, [a, b], b, {"step": 2, "val/closed_accuracy": 0.25})
    view.on_step_end(3, [a, b])
    view.on_trial_complete(4, [a, b], a)
    view.on_trial_error(5, [a, b], b)
    lines = [line.split("] ", 1)[-1] for line in stream.getvalue().splitlines()]
    assert lines[0].startswith("medalign sweep s1: 3 trials, 2 at a time, val/closed_accuracy (max)")
    assert "medalign dashboard /s" in lines[1] and "trial_<id>/trial.log" in lines[1]
    assert lines[2] == "trial_aa started   layer=2 lambda_align=0.25 rank=4"  # no alpha, no _sweep
    assert lines[3].startswith("trial_aa step 2/6  val/closed_accuracy=0.5") and lines[3].endswith("best 0.5 (aa)")
    assert lines[4].endswith("best 0.5 (aa)")  # a worse result keeps the best
    assert lines[5].startswith("status: 0 done, 2 running (aa 2/6, bb 2/6), 0 pending, 0 errored; best 0.5 (aa)")
    assert lines[6].startswith("trial_aa finished  step 2/6 (stopped early) val/closed_accuracy=0.5")
    assert lines[7] == "trial_bb ERROR     after step 2: see /s/trial_bb/error.txt and trial.log"
    assert len(lines) == 8


@pytest.mark.parametrize("verbose, tune_level, log_file", [(0, 0, True), (1, 0, True), (2, 1, False), (3, 2, False)])
def test_sweep_verbose_2_restores_tune_s_output_and_the_trials_own_console(tmp_path, verbose, tune_level, log_file):
    from medalign_platform.tune.driver import tune_verbosity
    from medalign_platform.tune.trial import trial_base_config, trial_run_config

    plan = SimpleNamespace(trial_resources={"CPU": 1}, num_workers=1, experiment_location=str(tmp_path),
                           executor="inline", verbose=verbose)
    base = {"ray": {}, "run": {"name": "x"}}
    config = trial_run_config(trial_base_config(base, plan, SimpleNamespace(rules={})), tmp_path / "trial_aa")
    assert tune_verbosity(verbose) == tune_level
    assert config["run"].get("console_log") == (str(tmp_path / "trial_aa" / "trial.log") if log_file else None)
