"""``medalign status``: leaderboard, best experiment file, importances, plots and the sweep's
TensorBoard, from a real small sweep (Ray Tune + Optuna on SQLite, inline trials, ASHA)."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
from conftest import NO_RAY_DASHBOARD
from medalign_platform.common.errors import ConfigError

METRIC = "val/grounding"  # varies between trials of an untrained tiny model (closed accuracy ties at 0)
MAX_STEPS = 4
SWEEP = ["experiment=synthmed_vqa", "search=smoke", f"trainer.max_steps={MAX_STEPS}", "trainer.eval_every=2",
         "trainer.val_size=8", "trainer.test_size=8", "trainer.batch_size=4", "trainer.log_every=1",
         "trainer.max_new_tokens=4", "sweep.executor=inline", "sweep.num_samples=4", "sweep.max_concurrent=2",
         "sweep.seed=0", f"sweep.metric={METRIC}", "sweep.asha.grace_period=2", "sweep.verbose=0",
         "sweep.name=board", NO_RAY_DASHBOARD]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """One real sweep (4 inline trials, ASHA at step 2 of 4) and ``write_results`` on it."""
    import ray
    from medalign_platform.tune.results import write_results
    from medalign_platform.tune.driver import run_sweep
    from synthmed_fixtures import mini_synthmed_env

    root = tmp_path_factory.mktemp("results")
    with mini_synthmed_env(root / "cache"):
        try:
            summary = run_sweep([*SWEEP, f"sweep.output_dir={root / 'sweeps'}"])
        finally:
            ray.shutdown()  # the tests read the folder as `medalign status` does: without Ray
        experiment = Path(summary["experiment_dir"])
        yield {"summary": summary, "dir": experiment, "result": write_results(experiment), "root": root,
               "records": {r["trial_id"]: r for r in json.loads((experiment / "summary.json").read_text())["records"]}}


def _table(markdown: str) -> list[dict]:
    """The rows of the first Markdown table in ``markdown`` as dicts keyed by its header."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:]]


def _study(experiment: Path):
    import optuna

    return optuna.load_study(study_name=experiment.name, storage=f"sqlite:///{experiment / 'optuna.db'}")


# --------------------------------------------------------------------------- the leaderboard


@pytest.mark.slow
def test_leaderboard_ranks_every_trial_by_the_sweep_metric(sweep):
    rows, records = sweep["result"]["leaderboard"], sweep["records"]
    assert len(rows) == len(records) == 4 and [r["rank"] for r in rows] == [1, 2, 3, 4]
    values = [r[METRIC] for r in rows]
    assert values == sorted(values, reverse=True)  # mode max
    assert values == [records[r["trial_id"]]["metrics"][METRIC] for r in rows]
    for row in rows:
        record = records[row["trial_id"]]
        assert row["status"] == "TERMINATED" and row["step"] == record["metrics"]["step"]
        assert row["stopped_early"] == (record["metrics"]["step"] < MAX_STEPS)
        final = Path(record["path"]) / "final.json"  # not written by a trial that ASHA stopped
        wall = json.loads(final.read_text())["trial_wall_s"] if final.is_file() else record["time_total_s"]
        assert row["wall_s"] == wall and wall > 0
    # ASHA (grace period 2, reduction factor 3) stops a later trial that is behind at step 2.
    assert any(r["stopped_early"] and r["step"] == 2 for r in rows), rows
    assert sweep["result"]["best"]["trial_id"] == sweep["summary"]["best"]["trial_id"] == rows[0]["trial_id"]
    study = {t.user_attrs["tune_trial_id"]: t for t in _study(sweep["dir"]).trials}
    assert {r["trial_id"]: r["optuna_trial"] for r in rows} == {k: t.number for k, t in study.items()}


@pytest.mark.slow
def test_csv_and_markdown_agree_with_the_trial_records(sweep):
    result, records = sweep["result"], sweep["records"]
    files = result["files"]
    with open(files["leaderboard_csv"], newline="") as handle:
        table = list(csv.DictReader(handle))
    keys = ["distill.lambda_align", "distill.layer", "lora.alpha", "lora.rank"]
    assert list(table[0])[:8] == ["rank", "trial_id", "optuna_trial", "status", *keys]
    assert list(table[0])[8] == METRIC  # the sweep metric is the first metric column
    assert [row["trial_id"] for row in table] == [r["trial_id"] for r in result["leaderboard"]]
    for row in table:
        record = records[row["trial_id"]]
        for key in keys:
            assert float(row[key]) == record["params"][key]
        for key, value in record["metrics"].items():
            if key.startswith(("val/", "test/")) and "/by_qtype/" not in key:  # breakdowns: trial results only
                assert float(row[key]) == value, key  # full precision
        assert not [column for column in row if "/by_qtype/" in column]
        assert int(row["step"]) == record["metrics"]["step"] and int(row["max_steps"]) == MAX_STEPS
        assert row["stopped_early"] == str(record["metrics"]["step"] < MAX_STEPS)

    markdown = _table(Path(files["leaderboard_md"]).read_text())
    assert [row["trial_id"] for row in markdown] == [row["trial_id"] for row in table]
    for row, csv_row in zip(markdown, table):
        assert row[METRIC] == f"{float(csv_row[METRIC]):.6g}"  # the sweep metric: 6 digits, the others 4
        assert row["test/grounding"] == ("" if csv_row["test/grounding"] == "" else
                                         f"{float(csv_row['test/grounding']):.4g}")
        assert row["step"] == f"{csv_row['step']}/{MAX_STEPS}"
        assert row["stopped_early"] == ("yes" if csv_row["stopped_early"] == "True" else "")
        assert "val/n_closed" not in row and "val/n_closed" in csv_row  # counts: CSV only


@pytest.mark.slow
def test_best_experiment_file_composes_to_the_best_trial_config(sweep):
    from medalign_platform.run.compose import compose_config

    best, info = sweep["summary"]["best"], sweep["result"]["best_experiment"]
    path = Path(info["path"])
    assert info["differences"] == [] and info["command"] == f"medalign train experiment={path}"
    text = path.read_text()
    assert text.startswith("# @package _global_\n")
    assert f"trial {best['trial_id']}" in text and f"{METRIC} = {best['metrics'][METRIC]}" in text
    assert f"# Run it:          medalign train experiment={path}" in text

    composed = compose_config([f"experiment={path}"])
    assert composed["run"] == {"name": "board-best", "output_dir": "runs", "log_dir": None, "console_log": None}
    without_run = lambda config: {k: v for k, v in config.items() if k != "run"}
    assert without_run(composed) == without_run(best["config"])
    assert composed["distill"]["lambda_align"] == best["params"]["distill.lambda_align"]  # exact float
    # Command-line overrides still apply on top, as with a preset.
    tuned = compose_config([f"experiment={path}", "trainer.max_steps=9"])
    assert tuned["trainer"]["max_steps"] == 9 and tuned["lora"] == best["config"]["lora"]


def test_missing_experiment_file_is_a_config_error(tmp_path):
    from medalign_platform.run.compose import compose_config

    with pytest.raises(ConfigError, match=r"experiment=.*nope\.yaml: no such file; give an experiment YAML"):
        compose_config([f"experiment={tmp_path / 'nope.yaml'}"])


# --------------------------------------------------------------------------- importances


@pytest.mark.slow
def test_importances_of_the_sweep_study(sweep):
    import optuna

    importances = json.loads(Path(sweep["result"]["files"]["importances_json"]).read_text())
    assert importances == sweep["result"]["importances"]
    study = _study(sweep["dir"])
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    varied = {name.replace("/", ".") for name in complete[0].params
              if len({t.params[name] for t in complete}) > 1}
    assert importances["completed_trials"] == len(complete) == 4
    (entry,) = importances["objectives"]
    assert (entry["metric"], entry["mode"], entry["reason"]) == (METRIC, "max", None)
    assert set(entry["importances"]) == varied and varied  # searched keys, rules (lora.alpha) excluded
    assert math.isclose(sum(entry["importances"].values()), 1.0)
    assert Path(sweep["result"]["files"]["importances_png"]).read_bytes()[:4] == b"\x89PNG"
    assert Path(sweep["result"]["files"]["history_png"]).read_bytes()[:4] == b"\x89PNG"


def _study_with(tmp_path: Path, directions: list[str], trials: list[tuple[dict, list[float]]]):
    import optuna

    study = optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}", directions=directions)
    distributions = {"distill/layer": optuna.distributions.IntDistribution(1, 3),
                     "distill/lambda_align": optuna.distributions.FloatDistribution(0.1, 2.0, log=True)}
    for params, values in trials:
        study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, values=values))
    return study


def test_importances_per_objective_follow_what_each_objective_depends_on(tmp_path):
    """Objective 1 (max) depends on the layer only, objective 2 (min) on lambda_align only."""
    import random

    from medalign_platform.tune.study_report import param_importances

    rng = random.Random(0)
    trials = []
    for _ in range(40):
        layer, weight = rng.randint(1, 3), math.exp(rng.uniform(math.log(0.1), math.log(2.0)))
        trials.append(({"distill/layer": layer, "distill/lambda_align": weight}, [float(layer), weight]))
    study = _study_with(tmp_path, ["maximize", "minimize"], trials)
    result = param_importances(study, ["val/closed_accuracy", "val/grounding"], ["max", "min"])
    first, second = result["objectives"]
    assert result["completed_trials"] == 40
    for entry in (first, second):
        assert set(entry["importances"]) == {"distill.layer", "distill.lambda_align"}
        assert math.isclose(sum(entry["importances"].values()), 1.0)
    assert first["importances"]["distill.layer"] > 0.9
    assert second["importances"]["distill.lambda_align"] > 0.9


def test_importances_say_why_when_there_are_none(tmp_path):
    from medalign_platform.tune.study_report import param_importances, plot_importances

    one = _study_with(tmp_path, ["maximize"], [({"distill/layer": 2, "distill/lambda_align": 1.0}, [0.5])])
    (entry,) = param_importances(one, ["val/grounding"], ["max"])["objectives"]
    assert entry["importances"] == {} and entry["reason"] == "1 completed trial(s): importances need at least 2"

    (tmp_path / "fixed").mkdir()
    fixed = [({"distill/layer": 2, "distill/lambda_align": 1.0}, [value]) for value in (0.1, 0.2, 0.3)]
    study = _study_with(tmp_path / "fixed", ["maximize"], fixed)
    (entry,) = param_importances(study, ["val/grounding"], ["max"])["objectives"]
    assert entry["reason"] == "no searched parameter varies among the 3 completed trials"
    assert param_importances(None, ["val/grounding"], ["max"])["objectives"][0]["reason"].startswith("no Optuna study")
    png = plot_importances({"objectives": [entry]}, tmp_path / "i.png", "s")  # a panel with the reason
    assert png.read_bytes()[:4] == b"\x89PNG"


# --------------------------------------------------------------------------- TensorBoard


def _events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


@pytest.mark.slow
def test_sweep_tensorboard_has_one_hparams_run_per_trial_with_its_val_curves(sweep):
    from tensorboard.plugins.hparams import api_pb2, metadata

    board, records = Path(sweep["result"]["files"]["tensorboard"]), sweep["records"]
    assert sorted(p.name for p in board.iterdir() if p.is_dir()) == sorted(f"trial_{i}" for i in records)
    keys = ["distill.lambda_align", "distill.layer", "lora.alpha", "lora.rank"]

    root = _events(board).PluginTagToContent("hparams")
    experiment = metadata.parse_experiment_plugin_data(root[metadata.EXPERIMENT_TAG])
    assert sorted(info.name for info in experiment.hparam_infos) == keys
    layer = next(info for info in experiment.hparam_infos if info.name == "distill.layer")
    assert (layer.domain_interval.min_value, layer.domain_interval.max_value) == (1, 3)
    tags = [info.name.tag for info in experiment.metric_infos]
    assert tags[0] == METRIC and "val/closed_accuracy" in tags and "test/grounding" in tags
    assert "val/n_closed" not in tags

    for trial_id, record in records.items():
        run = _events(board / f"trial_{trial_id}")
        plugin = run.PluginTagToContent("hparams")
        start = metadata.parse_session_start_info_plugin_data(plugin[metadata.SESSION_START_INFO_TAG])
        assert start.group_name == trial_id
        assert {k: v.number_value for k, v in start.hparams.items()} == {k: float(record["params"][k]) for k in keys}
        end = metadata.parse_session_end_info_plugin_data(plugin[metadata.SESSION_END_INFO_TAG])
        assert end.status == api_pb2.STATUS_SUCCESS
        own = _events(Path(record["path"]) / "tensorboard")  # the trial's own events
        evaluated = [t for t in own.Tags()["scalars"] if t.startswith(("val/", "test/")) and "/n_" not in t]
        assert sorted(run.Tags()["scalars"]) == sorted(evaluated)  # test/* only for trials ASHA did not stop
        for tag in evaluated:
            assert [(e.step, e.value) for e in run.Scalars(tag)] == [(e.step, e.value) for e in own.Scalars(tag)]
        steps = [e.step for e in run.Scalars(METRIC)]
        assert steps == list(range(2, record["metrics"]["step"] + 1, 2))  # every evaluation, up to the stop
        assert math.isclose(run.Scalars(METRIC)[-1].value, record["metrics"][METRIC], rel_tol=1e-6)


# --------------------------------------------------------------------------- the command


@pytest.mark.slow
def test_status_command_prints_the_leaderboard_and_the_commands(sweep, capsys):
    from medalign_platform.cli import main

    experiment, best = sweep["dir"], sweep["summary"]["best"]
    assert main(["status", str(experiment), "top=2"]) == 0
    out = capsys.readouterr().out
    rows = _table(out)
    assert [r["trial_id"] for r in rows] == [r["trial_id"] for r in sweep["result"]["leaderboard"][:2]]
    assert "(2 more trial(s) in leaderboard.csv)" in out
    assert f"Best trial {best['trial_id']}" in out and f"{METRIC} = {best['metrics'][METRIC]:.4g}" in out
    assert f"medalign train experiment={experiment / 'results' / 'best_experiment.yaml'}" in out
    assert f"medalign dashboard {experiment}" in out
    assert "Importances for val/grounding:" in out
    leftovers = [p.name for p in [*experiment.iterdir(), *(experiment / "results").iterdir()] if ".tmp" in p.name]
    assert leftovers == []  # every file was renamed into place


def test_status_explains_bad_paths_and_options(tmp_path, capsys):
    from medalign_platform.tune.results import status_command

    def status(path, *overrides) -> str:
        assert status_command(str(path), list(overrides)) == 2
        return capsys.readouterr().err

    assert "does not exist; pass the experiment folder of a sweep" in status(tmp_path / "missing")
    assert "is not a sweep folder (no sweep.json)" in status(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "sweep.json").write_text("{}")
    assert f"it holds the sweeps ['a']: pass one of them, e.g. {tmp_path / 'a'}" in status(tmp_path)
    (tmp_path / "a" / "trial_x").mkdir()
    assert f"it is inside the sweep folder {tmp_path / 'a'}: pass that" in status(tmp_path / "a" / "trial_x")
    assert "has not saved Ray Tune's experiment state yet" in status(tmp_path / "a")
    assert "unknown key rows; valid options: ['top']" in status(tmp_path / "a", "rows=3")
    assert "top must be an integer, got 'x'" in status(tmp_path / "a", "top=x")
    assert "top must be >= 1, got 0" in status(tmp_path / "a", "top=0")


@pytest.mark.slow
def test_status_of_a_running_sweep(sweep, tmp_path):
    """A copy of the sweep as a snapshot taken while its best trial still ran: Tune's state says
    RUNNING and the trial has no final.json yet. It ranks on its latest metric, its wall time
    is Tune's ``time_total_s``, it has no session end, and the best file names a finished trial."""
    from medalign_platform.tune.results import write_results
    from tensorboard.plugins.hparams import metadata

    copy = tmp_path / "board"
    shutil.copytree(sweep["dir"], copy, ignore=shutil.ignore_patterns("results", "tensorboard"))
    spec = json.loads((copy / "sweep.json").read_text())
    spec["settings"]["output_dir"] = str(tmp_path)
    (copy / "sweep.json").write_text(json.dumps(spec))
    running = sweep["result"]["leaderboard"][0]["trial_id"]
    (copy / f"trial_{running}" / "final.json").unlink()
    (state_file,) = copy.glob("experiment_state-*.json")
    state = json.loads(state_file.read_text())
    for entry in state["trial_data"]:
        trial = json.loads(entry[0])
        if trial["trial_id"] == running:
            entry[0] = json.dumps({**trial, "status": "RUNNING"})
    state_file.write_text(json.dumps(state))
    # ...and its driver is alive (this process): an unfinished trial of a stopped sweep
    # would be INTERRUPTED instead (tests/tune/test_sweep_bookkeeping.py).
    from medalign_platform.tune.layout import write_driver_state
    write_driver_state(copy, "running")

    result = write_results(copy)
    rows = {r["trial_id"]: r for r in result["leaderboard"]}
    row = rows[running]
    assert row["status"] == "RUNNING" and row["rank"] == 1 and not row["stopped_early"]
    last_result = json.loads(next(e for e in state["trial_data"] if running in e[0])[1])["last_result"]
    assert row["wall_s"] == last_result["time_total_s"]
    second = sweep["result"]["leaderboard"][1]["trial_id"]
    assert result["best"]["trial_id"] == second and rows[second]["status"] == "TERMINATED"
    assert f"trial {second}" in Path(result["best_experiment"]["path"]).read_text()
    plugin = _events(copy / "tensorboard" / f"trial_{running}").PluginTagToContent("hparams")
    assert metadata.SESSION_START_INFO_TAG in plugin and metadata.SESSION_END_INFO_TAG not in plugin
    again = write_results(copy, top=2)  # regenerated in place: still one run per trial
    assert len([p for p in (copy / "tensorboard").iterdir() if p.is_dir()]) == len(rows)
    assert [r["trial_id"] for r in again["leaderboard"]] == [r["trial_id"] for r in result["leaderboard"][:2]]
    assert "(2 more trial(s) in leaderboard.csv)" in (copy / "results" / "leaderboard.md").read_text()


@pytest.mark.slow
def test_the_sweep_keeps_a_whole_copy_of_tunes_state_for_resume(sweep):
    """A real sweep's folder holds ``.tune_state.zip`` (tune/state_backup.py): Tune's state
    files read whole and name every trial, so a kill during Tune's own copy cannot cost a resume."""
    import zipfile

    from medalign_platform.tune.state_backup import ARCHIVE, reads_whole, state_files

    with zipfile.ZipFile(sweep["dir"] / ARCHIVE) as archive:
        contents = {name: archive.read(name) for name in archive.namelist()}
    assert sorted(contents) == [p.name for p in state_files(sweep["dir"])]
    assert all(reads_whole(data) for data in contents.values())
    state = next(json.loads(data) for name, data in contents.items() if name.startswith("experiment_state-"))
    archived = {json.loads(entry[0])["trial_id"] for entry in state["trial_data"]}
    assert archived == set(sweep["records"])


@pytest.mark.slow
def test_a_resume_after_a_kill_during_tunes_state_copy_continues_from_the_archive(sweep, tmp_path):
    """The CI failure this guards against: a driver killed while Tune copied its state left
    both JSON state files empty, and ``resume=true`` ended in "no search space has been
    defined". With the archive, the resumed sweep knows its 4 finished trials and runs none again."""
    import ray
    from medalign_platform.tune.driver import run_sweep
    from medalign_platform.tune.state_backup import state_files
    from synthmed_fixtures import mini_synthmed_env

    copy = tmp_path / "sweeps" / sweep["dir"].name
    shutil.copytree(sweep["dir"], copy)
    emptied = [p for p in state_files(copy) if p.name.endswith(".json")]
    for path in emptied:
        path.write_bytes(b"")
    with mini_synthmed_env(tmp_path / "cache"):
        try:
            summary = run_sweep([*SWEEP, f"sweep.output_dir={tmp_path / 'sweeps'}", "resume=true"])
        finally:
            ray.shutdown()
    assert summary["resumed"] and summary["trials"] == {"TERMINATED": 4}, summary
    records = json.loads((copy / "summary.json").read_text())["records"]
    assert {r["trial_id"] for r in records} == set(sweep["records"])   # no trial started again
    assert all(path.stat().st_size > 0 for path in emptied)
