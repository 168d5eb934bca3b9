"""One run on a real local Ray cluster: 2 DDP workers, a killed worker, TensorBoard, export."""

from __future__ import annotations

import json
import math

import pytest
from conftest import NO_RAY_DASHBOARD
import torch
from synthmed_fixtures import mini_synthmed_env

pytestmark = pytest.mark.slow

STEPS = ["trainer.max_steps=6", "trainer.eval_every=2", "trainer.batch_size=4", "trainer.val_size=8",
         "trainer.test_size=8", "trainer.log_every=1", "trainer.max_new_tokens=4", "lora.rank=4",
         "distill.lambda_attn=0.5", "distill.steer.mode=low_rank", "distill.steer.rank=4", NO_RAY_DASHBOARD]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """Trains once with 2 workers, killing rank 1 right after step 3."""
    from medalign_platform.cli import main

    root = tmp_path_factory.mktemp("ray_run")
    marker = root / "killed"
    overrides = ["experiment=synthmed_vqa", *STEPS, "ray.num_workers=2", f"run.output_dir={root / 'runs'}",
                 "run.name=two_workers"]
    with mini_synthmed_env(root / "cache", MEDALIGN_TEST_KILL=f"1:3:{marker}"):
        assert main(["train", *overrides]) == 0  # the same path as `medalign train ...`
    summary = json.loads((root / "runs" / "two_workers" / "summary.json").read_text())
    config = json.loads((root / "runs" / "two_workers" / "config.json").read_text())
    return summary, config, marker


def test_run_survives_a_killed_worker_without_losing_steps_or_evaluations(finished_run):
    summary, _, marker = finished_run
    assert marker.exists(), "rank 1 was never killed"
    metrics = summary["metrics"]
    assert metrics["step"] == 6
    checkpoint_state = json.loads(open(f"{summary['checkpoint']}/trainer_state.json").read())
    assert checkpoint_state["step"] == 6
    assert checkpoint_state["evaluations"] == [2, 4, 6]
    for key in ("val/closed_accuracy", "test/closed_accuracy", "val/grounding", "train/spatial"):
        assert math.isfinite(metrics[key])
    assert summary["target_cache"]["train"]["misses"] >= 0  # filled on the driver


def test_tensorboard_events_hold_scalars_images_text_and_hparams(finished_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary, _, _ = finished_run
    events = EventAccumulator(summary["tensorboard"], size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    for tag in ("train/loss", "train/lm", "train/spatial", "train/attention", "train/lr", "train/grad_norm",
                "perf/samples_per_s", "val/closed_accuracy", "val/grounding", "test/closed_accuracy"):
        assert tag in tags["scalars"], tag
    loss_steps = sorted({event.step for event in events.Scalars("train/loss")})
    assert loss_steps == [1, 2, 3, 4, 5, 6]
    assert [e.step for e in events.Scalars("val/closed_accuracy")][-3:] == [2, 4, 6]
    assert all(math.isfinite(e.value) for e in events.Scalars("train/loss"))
    for index in range(4):
        images = events.Images(f"val/attention_{index}")
        assert images and images[-1].width == 3 * images[-1].height  # image | teacher | student
    assert any(tag.endswith("predictions/text_summary") for tag in tags["tensors"])
    from tensorboard.plugins.hparams import plugin_data_pb2

    hparams = events.PluginTagToContent("hparams")
    session = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/session_start_info"])
    values = session.session_start_info.hparams
    assert values["distill/layer"].number_value == 2 and values["lora/rank"].number_value == 4
    experiment = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/experiment"]).experiment
    assert "val/closed_accuracy" in {m.name.tag for m in experiment.metric_infos}


def test_export_reproduces_the_final_predictions(finished_run, tmp_path):
    from medalign_platform.data.collate import generate_answers
    from medalign_platform.data.splits import evaluation_items, load_split
    from medalign_platform.cli import main
    from medalign_platform.run.export import load_exported

    summary, config, _ = finished_run
    out = tmp_path / "export"
    assert main(["export", summary["run_dir"], "--out", str(out)]) == 0
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    model, processor, tap = load_exported(out)
    assert tap is not None  # the run used a low-rank steer adapter
    recorded = json.loads((out / "predictions.json").read_text())["test"]
    items = evaluation_items(load_split(config["data"], "test"), config["trainer"]["test_size"])
    with torch.no_grad():
        answers = generate_answers(model, processor, items, max_new_tokens=config["trainer"]["max_new_tokens"])
    assert [r["id"] for r in recorded] == [item["id"] for item in items]
    assert answers == [r["prediction"] for r in recorded]
