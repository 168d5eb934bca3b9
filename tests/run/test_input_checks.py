"""Bad input fails on the driver, before anything trains, as one line naming the key or file:
the examples of issue #13, checked through the `medalign` command itself."""

from __future__ import annotations

import json
import shutil
import socket
import time
from pathlib import Path

import pytest

from medalign_platform.cli import main

FAST = ["experiment=synthmed_vqa", "trainer.max_steps=4", "trainer.eval_every=2", "trainer.val_size=4",
        "trainer.test_size=4", "trainer.batch_size=4", "trainer.max_new_tokens=2"]


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    from medalign_platform.synthmed.prepare import prepare_mini_synthmed

    cache = tmp_path_factory.mktemp("inputs_cache")
    return cache, prepare_mini_synthmed(cache, n_train=8, n_val=4, n_test=4)


@pytest.fixture()
def env(mini, monkeypatch, tmp_path):
    cache, record = mini
    monkeypatch.setenv("MEDALIGN_CACHE", str(cache))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.chdir(tmp_path)  # relative output folders land here
    return record


def _one_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert lines and lines[-1].startswith(f"medalign {command}: "), err
    return lines[-1]


@pytest.mark.parametrize("override, message", [
    ("trainer.max_steps=abc", "trainer.max_steps must be an integer, got 'abc'"),
    ("distill.layer=abc", "distill.layer must be an integer, got 'abc'"),
    ("distill.layer=2.5", "distill.layer must be an integer, got 2.5"),
    ("trainer.max_steps=20.5", "trainer.max_steps must be an integer, got 20.5"),
    ("lora.rank=8.5", "lora.rank must be an integer, got 8.5"),
    ("trainer.batch_size=true", "trainer.batch_size must be an integer, got True"),
    ("ray.num_workers=0", "ray.num_workers must be >= 1, got 0"),
    ("data.on_error=bogus", "data.on_error must be one of 'raise', 'skip', got 'bogus'"),
    ("data.max_length=-5", "data.max_length must be >= 1, got -5"),
    ("resume=maybe", "resume must be true or false, got 'maybe'"),
    ("run.name=../../x", "run.name must be a plain folder name"),
    ("run.name=/etc", "run.name must be a plain folder name"),
    ("distill.layer=4", "distill.layer=4 is outside the model"),
])
def test_each_bad_train_value_is_one_line_naming_the_key_before_ray(env, capsys, tmp_path, override, message):
    import ray

    assert main(["train", *FAST, override]) == 2
    assert message in _one_line(capsys, "train")
    assert not ray.is_initialized() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("overrides, message", [
    (["resume=maybe"], "sweep.resume must be true or false, got 'maybe'"),
    (["sweep.metric=val/bogus"], "sweep.metric=val/bogus is not reported by the evaluation of this data"),
    (["sweep.metric=val/closed_acuracy"], "did you mean val/closed_accuracy?"),
    (["sweep.metric=val/report_bleu4"], "sweep.metric=val/report_bleu4 is not reported"),  # a VQA dataset
    (["sweep.metric=test/closed_accuracy"], "selects trials on the test split"),
    (["sweep.metric=test/closed_accuracy", "sweep.allow_test_selection=true"], "ASHA cannot rank trials on it"),
    (["sweep.name=../x"], "sweep.name must be a plain folder name (no '/', '.' or '..'), got '../x'"),
    (["sweep.executor=train", "ray.include_dashboard=false"],
     "ray.include_dashboard=false: ASHA early stopping of sweep.executor=train trials needs the Ray state API"),
])
def test_each_bad_sweep_value_is_one_line_before_anything_trains(env, capsys, tmp_path, overrides, message):
    import ray

    assert main(["sweep", *FAST, "search=smoke", "sweep.output_dir=sw", "sweep.name=s", *overrides]) == 2
    assert message in _one_line(capsys, "sweep")
    assert not ray.is_initialized() and not (tmp_path / "sw" / "s").exists()  # nothing started, nothing written


def test_test_selection_is_planned_when_explicitly_allowed(env):
    from medalign_platform.tune.driver import prepare_sweep

    plan, _, _ = prepare_sweep([*FAST, "search=smoke", "sweep.metric=test/closed_accuracy",
                                "sweep.allow_test_selection=true", "sweep.asha.enabled=false"])
    assert plan.metrics == ["test/closed_accuracy"] and plan.allow_test_selection and not plan.asha_enabled


@pytest.mark.parametrize("overrides", [["sweep.executor=train", "sweep.asha.enabled=false"],
                                       ["sweep.executor=inline"]])
def test_a_cluster_without_dashboard_is_planned_when_no_train_trial_is_stopped_early(env, overrides):
    from medalign_platform.tune.driver import prepare_sweep

    plan, _, base = prepare_sweep([*FAST, "search=smoke", "ray.include_dashboard=false", *overrides])
    assert not base.ray.include_dashboard and plan.executor == overrides[0].split("=")[1]


def _copy_split(record: dict, tmp_path: Path, edit) -> Path:
    """A copy of the val split's JSON beside the original images (same folder), edited."""
    data = Path(record["data"])
    records = json.loads((data / "val.json").read_text())
    edit(records)
    path = data / f"val-{tmp_path.name}.json"
    path.write_text(json.dumps(records))
    return path


@pytest.mark.parametrize("escape", ["../../../x.png", "/etc/hostname", "images/../../outside.png"])
def test_an_image_path_leaving_the_dataset_root_is_refused_and_never_opened(env, capsys, tmp_path, escape):
    data = Path(env["data"])
    outside = data.parent / "outside.png"
    shutil.copy(data / "images" / "val-00000.png", outside)  # a valid image: only confinement can refuse it
    path = _copy_split(env, tmp_path, lambda records: records[0].update(image=escape))
    try:
        assert main(["train", *FAST, f"data.val={path}"]) == 2
    finally:
        path.unlink()
    line = _one_line(capsys, "train")
    assert f"image path {escape!r} leaves the dataset root" in line and str(path) in line


def test_a_truncated_png_names_the_file_even_without_upfront_validation(env, capsys, tmp_path):
    data = Path(env["data"])
    broken = data / "images" / f"truncated-{tmp_path.name}.png"
    png = (data / "images" / "val-00001.png").read_bytes()
    broken.write_bytes(png[: len(png) // 2])
    path = _copy_split(env, tmp_path, lambda records: records[0].update(image=f"images/{broken.name}"))
    try:
        assert main(["train", *FAST, f"data.val={path}", "data.validate_images=false"]) == 2
    finally:
        path.unlink()
        broken.unlink()
    line = _one_line(capsys, "train")
    assert f"unreadable image {broken}" in line and "data.validate_images=true" in line


def test_an_existing_run_folder_is_refused_unless_resume(env, capsys, tmp_path):
    run = tmp_path / "runs" / "taken"
    (run / "tensorboard").mkdir(parents=True)
    assert main(["train", *FAST, "run.name=taken"]) == 2
    line = _one_line(capsys, "train")
    assert f"{run} already holds a run" in line and "resume=true" in line and "new run.name" in line


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("where", ["ray.address", "RAY_ADDRESS", "ray_current_cluster"])
def test_a_dead_ray_address_fails_within_seconds_naming_it(env, capsys, monkeypatch, tmp_path, where):
    """Nothing listens at the address (a cluster stopped with SIGTERM): one line, no retry loop."""
    import ray

    dead = f"127.0.0.1:{_free_port()}"
    overrides = [*FAST]
    if where == "ray.address":
        overrides.append(f"ray.address={dead}")
    elif where == "RAY_ADDRESS":
        monkeypatch.setenv("RAY_ADDRESS", dead)
    else:  # what `ray start` leaves behind; only ray.address=auto reads it
        monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
        (tmp_path / "ray").mkdir()
        (tmp_path / "ray" / "ray_current_cluster").write_text(dead)
        overrides.append("ray.address=auto")
    started = time.monotonic()
    assert main(["train", *overrides]) == 2
    assert time.monotonic() - started < 60  # Ray itself would retry for minutes
    line = _one_line(capsys, "train")
    assert f"no Ray cluster answers at {dead}" in line and "ray.address=null" in line
    assert {"ray.address": "ray.address=", "RAY_ADDRESS": "RAY_ADDRESS=",
            "ray_current_cluster": "ray_current_cluster"}[where] in line
    assert not ray.is_initialized()


def test_null_address_means_a_local_cluster_whatever_ray_current_cluster_says(monkeypatch, tmp_path):
    from medalign_platform.run.cluster import ray_init_address

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{_free_port()}")
    assert ray_init_address(None)[0] == "local"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")  # a submitted job's entrypoint: join its cluster
    assert ray_init_address(None)[0] == "10.0.0.5:6379"


def test_resources_are_checked_against_every_node():
    from medalign_platform.run.cluster import fits, worker_resources

    nodes = [{"CPU": 2.0, "memory": 1e9}, {"CPU": 8.0, "GPU": 1.0}]
    assert fits(nodes, {"CPU": 1}) and fits(nodes, {"CPU": 4, "GPU": 1}) and fits(nodes, {"CPU": 1}, 10)
    assert not fits(nodes, {"GPU": 1}, 2) and not fits(nodes, {"CPU": 16}) and not fits(nodes[:1], {"GPU": 0.5})
    assert not fits(nodes, {"TPU": 1}) and fits(nodes, {"GPU": 0})
    assert worker_resources({"CPU": 1.0}, use_gpu=True) == {"CPU": 1.0, "GPU": 1.0}
