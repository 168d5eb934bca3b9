"""Sweeps on shared storage: ``sweep.output_dir`` on S3, ``sweep.storage`` (SQLite, journal,
PostgreSQL), private experiment folders, and a sweep killed and resumed with its study in a
real PostgreSQL server."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ray_cluster import kill_tree
from medalign_platform.common.errors import ConfigError


def plan_for(overrides, config):
    from medalign_platform.run.settings import RunSettings
    from medalign_platform.tune.search_space import load_search_space
    from medalign_platform.tune.settings import parse_sweep_request, resolve_plan

    request = parse_sweep_request(["search=smoke", *overrides])
    return resolve_plan(request, RunSettings.from_config(config), load_search_space("smoke"))


# --------------------------------------------------------------------------- settings (fast)


def test_a_uri_output_dir_is_kept_as_a_uri(stub_config, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDALIGN_CACHE", str(tmp_path))
    plan = plan_for(["sweep.output_dir='s3://bucket/sweeps/?endpoint_override=127.0.0.1:9000'", "sweep.name=x"],  # quoted: it holds =
                    stub_config)
    assert plan.output_dir == "s3://bucket/sweeps?endpoint_override=127.0.0.1:9000"
    assert plan.experiment_location == "s3://bucket/sweeps/x?endpoint_override=127.0.0.1:9000"
    with pytest.raises(ConfigError, match="lives in remote storage"):
        plan.experiment_dir  # noqa: B018 - a property that must refuse
    assert plan.study_dir.is_relative_to(tmp_path / "remote") and plan.study_dir.name == "driver-study"
    assert plan.storage_url == f"sqlite:///{plan.study_dir / 'optuna.db'}"


@pytest.mark.parametrize("value, match", [
    ("postgresql://me:secret@db:5432/studies", r"must not contain a password .* PGPASSWORD"),
    ("studies.txt", r"neither sqlite, journal, a journal file .* nor a database URL"),
    ("postgresql://db:notaport/studies", r"not a database URL"),
])
def test_bad_study_storage_is_refused_naming_the_key(value, match, stub_config):
    with pytest.raises(ConfigError, match=match):
        plan_for([f"sweep.storage={value}"], stub_config)


def test_study_storage_kinds_resolve_beside_the_experiment(stub_config, tmp_path):
    from medalign_platform.tune.study_storage import resolve_storage

    assert resolve_storage(None, tmp_path).url == f"sqlite:///{tmp_path / 'optuna.db'}"
    assert resolve_storage("journal", tmp_path).target == str(tmp_path / "optuna.journal")
    shared = resolve_storage(str(tmp_path / "nfs" / "study.journal"), tmp_path / "exp")
    assert (shared.kind, shared.target) == ("journal_file", str(tmp_path / "nfs" / "study.journal"))
    database = resolve_storage("postgresql://me@db:5432/studies", tmp_path)
    assert (database.kind, database.url) == ("rdb", "postgresql://me@db:5432/studies")


def test_a_database_that_does_not_answer_fails_before_ray_starts(stub_config, tmp_path):
    from medalign_platform.run.filesystems import StoragePath
    from medalign_platform.tune.driver import open_study
    from storage_servers import free_port

    plan = plan_for([f"sweep.output_dir={tmp_path}", f"sweep.storage=postgresql://me@127.0.0.1:{free_port()}/x"],
                    stub_config)
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"sweep.storage=postgresql://me@127.0.0.1:\d+/x: cannot open the study "
                                          r"storage .*start the database or fix the URL"):
        open_study(plan, StoragePath(plan.experiment_location))
    assert time.monotonic() - started < 30


def test_journal_study_is_found_by_the_readers(stub_config, tmp_path):
    import optuna
    from medalign_platform.run.filesystems import StoragePath
    from medalign_platform.tune.driver import open_study
    from medalign_platform.tune.layout import study_storage

    plan = plan_for([f"sweep.output_dir={tmp_path}", "sweep.name=j", "sweep.storage=journal"], stub_config)
    storage = open_study(plan, StoragePath(plan.experiment_location))
    study = optuna.create_study(study_name="j", storage=storage.open(), direction="maximize")
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=3)
    (tmp_path / "j" / "sweep.json").write_text(json.dumps({"settings": plan.to_dict()}))
    found = study_storage(tmp_path / "j")
    assert found.kind == "journal" and found.target == str(tmp_path / "j" / "optuna.journal")
    loaded = optuna.load_study(study_name="j", storage=found.open())
    assert [t.values for t in loaded.trials] == [t.values for t in study.trials]


def test_file_study_of_a_remote_experiment_is_copied_there_and_back(stub_config, s3, tmp_path, monkeypatch):
    """The driver writes a SQLite study locally; the uploader copies it into the S3 experiment
    folder, and a driver elsewhere (no local copy) starts from that copy."""
    import optuna
    from medalign_platform.run.filesystems import StoragePath
    from medalign_platform.tune.driver import _study_uploader, open_study

    monkeypatch.setenv("MEDALIGN_CACHE", str(tmp_path / "cache"))
    plan = plan_for([f"sweep.output_dir={s3.uri('studies')}", "sweep.name=remote"], stub_config)
    location = StoragePath(plan.experiment_location)
    storage = open_study(plan, location)
    assert storage.kind == "sqlite" and Path(storage.target).parent == plan.study_dir
    assert stat.S_IMODE(plan.study_dir.stat().st_mode) == 0o700
    uploader = _study_uploader(storage, location)
    study = optuna.create_study(study_name="remote", storage=storage.open())
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    uploader.stop()
    assert (location / "optuna.db").size() == Path(storage.target).stat().st_size

    Path(storage.target).unlink()  # another machine: no local copy yet
    again = open_study(plan, location)
    assert [t.params for t in optuna.load_study(study_name="remote", storage=again.open()).trials] == \
        [t.params for t in study.trials]


def test_newest_checkpoint_of_a_trial_on_s3_skips_a_partial_upload(s3):
    from medalign_platform.run.filesystems import StoragePath
    from medalign_platform.tune.trial import newest_trial_checkpoint

    trial = StoragePath(s3.uri("ckpt", "trial_a"))
    for step, complete in ((2, True), (4, False)):
        folder = trial / f"checkpoint_{step // 2:06d}"
        (folder / "trainer_state.json").write_json({"step": step})
        (folder / "adapter" / "adapter_model.safetensors").write_bytes(b"w" * 10)
        sizes = {name: size for name, (size, _) in folder.files().items()}
        if not complete:  # the manifest promises a file that never arrived
            sizes["optimizer.pt"] = 99
        (folder / "manifest.json").write_json(sizes)
    (trial / "params.json").write_json({})
    step, folder = newest_trial_checkpoint(trial)
    assert step == 2 and str(folder) == s3.uri("ckpt", "trial_a", "checkpoint_000001")


def test_resume_refuses_a_folder_others_can_write(tmp_path):
    from medalign_platform.tune.layout import check_private

    folder = tmp_path / "exp"
    folder.mkdir()
    (folder / "tuner.pkl").write_bytes(b"x")
    os.chmod(folder, 0o700)
    check_private(folder)  # ours, private: fine
    os.chmod(folder / "tuner.pkl", 0o666)
    with pytest.raises(ConfigError, match=r"resume=true refused: .*tuner.pkl can be written by other users .*"
                                          r"unpickles Tune's state files.*chmod -R go-w"):
        check_private(folder)
    os.chmod(folder / "tuner.pkl", 0o600)
    # Also unpickled on resume: Tune's searcher-generator state (a pickle under a .json name)
    # and the archived copy of the state that resume may put back (tune/state_backup.py).
    for name in ("search_gen_state-2026-12-01_06-38-18.json", ".tune_state.zip"):
        (folder / name).write_bytes(b"x")
        check_private(folder)
        os.chmod(folder / name, 0o666)
        with pytest.raises(ConfigError, match=rf"resume=true refused: .*{re.escape(name)} can be written by other"):
            check_private(folder)
        os.chmod(folder / name, 0o600)


def test_layer_ablation_refuses_an_object_store_folder():
    from medalign_platform.tune.ablation import parse_ablation_args, plan_ablation

    with pytest.raises(ConfigError, match=r"ablation.output_dir=s3://b/x: medalign ablate-layers needs a local folder"):
        plan_ablation(parse_ablation_args(["experiment=synthmed_vqa", "layers=[1,2]", "ablation.output_dir=s3://b/x"]))


# --------------------------------------------------------------------------- PostgreSQL, killed and resumed

MAX_STEPS = 6  # checkpoints at 2, 4, 6: the kill, seen at 2 or 4, lands before the last
SWEEP = ["experiment=synthmed_vqa", "search=smoke", f"trainer.max_steps={MAX_STEPS}", "trainer.eval_every=2",
         "trainer.val_size=8", "trainer.test_size=8", "trainer.batch_size=4", "trainer.log_every=1",
         "trainer.max_new_tokens=4", "sweep.num_samples=1", "sweep.max_concurrent=1", "sweep.seed=0",
         f"sweep.asha.grace_period={MAX_STEPS}", "sweep.name=pg", "sweep.executor=inline", "sweep.verbose=0"]
KILL_TIMEOUT_S = 300
# The processes of a cluster the platform starts for itself, all of which must listen on loopback only.
CLUSTER_PARTS = ("gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent")


def _newest_step(trial: Path) -> int:
    from medalign_platform.tune.trial import newest_trial_checkpoint

    newest = newest_trial_checkpoint(trial)
    return newest[0] if newest else 0


@pytest.fixture(scope="module")
def postgres_resumed(tmp_path_factory, postgres):
    """A one-trial sweep with its study in PostgreSQL (the session's server): the driver is
    SIGKILLed while the trial is half-way (a checkpoint written, the study trial RUNNING),
    then ``medalign sweep ... resume=true`` finishes it. Just before the kill, the listening sockets of the driver's own Ray cluster
    (``ray.address`` null) are recorded."""
    import optuna
    import psutil
    from medalign_platform.synthmed.prepare import prepare_mini_synthmed
    from ray_cluster import listening_sockets

    root = tmp_path_factory.mktemp("pg_sweep")
    prepare_mini_synthmed(root / "cache")
    overrides = [*SWEEP, f"sweep.output_dir={root / 'sweeps'}", f"sweep.storage={postgres.url}"]
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},  # a cluster of its own
           "MEDALIGN_CACHE": str(root / "cache"), "HF_HUB_OFFLINE": "1"}
    experiment = root / "sweeps" / "pg"
    command = [sys.executable, "-m", "medalign_platform", "sweep", *overrides]
    started = time.monotonic()
    with (root / "driver.log").open("w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    killed = listening = None
    storage = optuna.storages.RDBStorage(postgres.url)  # one connection pool for every poll
    try:
        deadline = time.monotonic() + KILL_TIMEOUT_S
        while time.monotonic() < deadline and process.poll() is None:
            try:
                trials = optuna.load_study(study_name="pg", storage=storage).get_trials(deepcopy=False)
            except KeyError:
                trials = []  # not created yet
            in_study = [t.state.name for t in trials]
            if in_study == ["RUNNING"] and listening is None and any(experiment.glob("trial_*/trial.log")):
                # Recorded once the trial process writes its log (its worker included), not at the kill: listing
                # sockets takes long enough on a busy machine for the trial to finish meanwhile.
                listening = listening_sockets(psutil.Process(process.pid))
            running = [t for t in experiment.glob("trial_*") if 0 < _newest_step(t) < MAX_STEPS]
            if in_study == ["RUNNING"] and running and listening is not None:
                killed = {"running": running[0].name, "after_s": time.monotonic() - started, "listening": listening}
                break
            time.sleep(0.25)  # poll interval
    finally:
        if process.poll() is None:
            kill_tree(process)
    assert killed, f"no half-way trial seen:\n{(root / 'driver.log').read_text()[-4000:]}"
    killed["step_at_kill"] = _newest_step(experiment / killed["running"])
    killed["mode"] = stat.S_IMODE(experiment.stat().st_mode)
    tick = time.monotonic()
    resumed = subprocess.run([*command, "resume=true"], env=env, capture_output=True, text=True,
                             timeout=KILL_TIMEOUT_S, check=False)
    killed["resume_s"] = time.monotonic() - tick
    print(f"\npostgres sweep killed after {killed['after_s']:.0f}s, resumed in {killed['resume_s']:.0f}s")
    study = optuna.load_study(study_name="pg", storage=storage)
    yield {"killed": killed, "resumed": resumed, "experiment": experiment,
           "trials": study.get_trials(deepcopy=True), "pg": postgres}


@pytest.mark.slow
def test_killed_sweep_resumes_with_its_study_in_postgresql(postgres_resumed):
    killed, resumed = postgres_resumed["killed"], postgres_resumed["resumed"]
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    experiment = postgres_resumed["experiment"]
    summary = json.loads((experiment / "summary.json").read_text())
    assert summary["resumed"] and summary["trials"] == {"TERMINATED": 1}
    assert summary["study"]["storage"] == postgres_resumed["pg"].url
    assert not (experiment / "optuna.db").exists()  # the study is in the database, not beside sweep.json
    trials = postgres_resumed["trials"]
    # the study trial the killed driver left RUNNING is the one completed: no orphan, no duplicate
    assert [t.state.name for t in trials] == ["COMPLETE"]
    [record] = summary["records"]
    assert f"trial_{trials[0].user_attrs['tune_trial_id']}" == killed["running"] == f"trial_{record['trial_id']}"
    assert trials[0].values == [record["metrics"]["val/closed_accuracy"]]  # the study holds the final metric
    # the half-way trial continued from its checkpoint
    assert 0 < killed["step_at_kill"] < MAX_STEPS
    final = json.loads((experiment / killed["running"] / "final.json").read_text())
    assert final["metrics"]["step"] == MAX_STEPS and killed["step_at_kill"] <= final["metrics"]["perf/start_step"]


@pytest.mark.slow
def test_sweep_folder_is_private(postgres_resumed):
    assert postgres_resumed["killed"]["mode"] == 0o700
    assert stat.S_IMODE(postgres_resumed["experiment"].stat().st_mode) == 0o700


@pytest.mark.slow
def test_the_sweep_cluster_listens_on_loopback_only(postgres_resumed):
    """``ray.address`` null: the cluster the sweep started for itself (GCS, raylet, dashboard,
    dashboard agent with its metrics export port, runtime-env agent, the trial's worker) binds
    127.0.0.1 only; Ray's default is every interface, its metrics ports without authentication."""
    from ray_cluster import is_loopback

    listening = postgres_resumed["killed"]["listening"]
    names = " ".join(listening.values())
    assert all(part in names for part in CLUSTER_PARTS), f"not every Ray process was listening: {listening}"
    assert len(listening) >= 6
    exposed = {address: name for address, name in listening.items() if not is_loopback(address[0])}
    assert exposed == {}, f"listening beyond loopback: {exposed}"
