"""``medalign train run.output_dir=s3://...`` on a real local S3 server (moto), then
``medalign export`` from the bucket into the bucket and into a local folder."""

from __future__ import annotations

import json
import re

import pytest
from conftest import NO_RAY_DASHBOARD
from synthmed_fixtures import mini_synthmed_env

pytestmark = pytest.mark.slow

STEPS = ["trainer.max_steps=4", "trainer.eval_every=2", "trainer.batch_size=4", "trainer.val_size=8",
         "trainer.test_size=8", "trainer.log_every=1", "trainer.max_new_tokens=4", "lora.rank=4", NO_RAY_DASHBOARD]


@pytest.fixture(scope="module")
def remote_run(tmp_path_factory, s3):
    from medalign_platform.cli import main

    root = tmp_path_factory.mktemp("remote_run")
    with mini_synthmed_env(root / "cache"):
        runs = s3.uri("runs")
        assert main(["train", "experiment=synthmed_vqa", *STEPS, f"run.output_dir={runs}", "run.name=r1"]) == 0
        exported = s3.uri("exports", "r1")
        assert main(["export", f"{runs}/r1", "--out", exported]) == 0
        local_export = root / "export"
        assert main(["export", f"{runs}/r1", "--out", str(local_export)]) == 0
        yield {"run": f"{runs}/r1", "export": exported, "local_export": local_export, "s3": s3, "root": root}


def test_the_run_writes_config_summary_checkpoints_and_events_to_the_bucket(remote_run):
    from medalign_platform.run.filesystems import StoragePath

    run = StoragePath(remote_run["run"])
    files = run.files()
    assert (run / "config.json").read_json()["run"]["output_dir"] == remote_run["s3"].uri("runs")
    summary = (run / "summary.json").read_json()
    assert summary["run_dir"] == remote_run["run"] and summary["tensorboard"] == f"{remote_run['run']}/tensorboard"
    assert summary["metrics"]["step"] == 4
    steps = sorted(json.loads((run / name).read_text())["step"] for name in files
                   if re.fullmatch(r"checkpoint_[^/]+/trainer_state\.json", name))
    assert steps == [2, 4]  # Ray Train persisted both checkpoints (num_to_keep: 2 by default here)
    events = [name for name in files if name.startswith("tensorboard/events.out.tfevents.")]
    assert len(events) == 1 and files[events[0]][0] > 0  # rank 0's events, uploaded from its scratch folder

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    local = remote_run["root"] / "events"
    (run / "tensorboard").download(local)
    accumulator = EventAccumulator(str(local), size_guidance={"scalars": 0})
    accumulator.Reload()
    assert [e.step for e in accumulator.Scalars("val/closed_accuracy")] == [2, 4]
    assert [e.step for e in accumulator.Scalars("train/loss")] == [1, 2, 3, 4]


def test_export_reads_the_bucket_and_writes_to_it(remote_run):
    from medalign_platform.run.export import EXPORT_FILE, load_exported
    from medalign_platform.run.filesystems import StoragePath

    export = StoragePath(remote_run["export"])
    assert {"adapter_config.json", "adapter_model.safetensors", "predictions.json", EXPORT_FILE} <= set(export.files())
    info = (export / EXPORT_FILE).read_json()
    assert info["step"] == 4 and info["source_checkpoint"].startswith(remote_run["run"] + "/checkpoint_")
    source = StoragePath(info["source_checkpoint"]) / "adapter" / "adapter_model.safetensors"
    assert (export / "adapter_model.safetensors").read_bytes() == source.read_bytes()  # the step-4 adapter
    local = remote_run["local_export"]
    assert (local / "adapter_model.safetensors").read_bytes() == source.read_bytes()
    assert json.loads((local / EXPORT_FILE).read_text())["source_checkpoint"] == info["source_checkpoint"]

    import torch
    from safetensors.torch import load_file

    model, _, _ = load_exported(local)  # the exported adapter, loaded onto the base model
    saved = load_file(str(local / "adapter_model.safetensors"))
    loaded = dict(model.named_parameters())
    lora = [key for key in saved if "lora_B" in key]
    assert lora and any(saved[key].abs().sum() > 0 for key in lora)  # trained: LoRA B leaves zero
    for key in lora:
        name = key.replace(".weight", ".default.weight")
        assert torch.equal(loaded[name].detach(), saved[key]), key


def test_dashboard_serves_the_remote_run_from_a_mirror_without_checkpoints(remote_run, monkeypatch):
    """``medalign dashboard s3://.../r1`` (a train run): TensorBoard gets a local mirror of the
    run's events; the checkpoints stay in the bucket."""
    from medalign_platform.run.filesystems import StoragePath
    from medalign_platform.tune.dashboard import _remote_folder, find_logdir

    monkeypatch.setenv("MEDALIGN_CACHE", str(remote_run["root"] / "dashboard-cache"))
    local, _ = _remote_folder(remote_run["run"])
    assert local.is_relative_to(remote_run["root"] / "dashboard-cache" / "remote")
    assert find_logdir(local) == local / "tensorboard"
    mirrored = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    remote = {name: size for name, (size, _) in StoragePath(remote_run["run"]).files().items()
              if not name.startswith("checkpoint_")}
    assert mirrored == sorted(remote) and any(name.startswith("tensorboard/events.") for name in mirrored)
    assert all((local / name).stat().st_size == size for name, size in remote.items())
