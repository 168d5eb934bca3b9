"""Config validation and the training loop without Ray (resume, NaN, checkpoints)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from medalign_platform.common.errors import ConfigError
from medalign_platform.run.compose import compose_config
from medalign_platform.run.settings import RunSettings
from medalign_platform.synthmed.prepare import prepare_mini_synthmed
from medalign_platform.run.loop import NonFiniteLossError, RunContext, run_training

FAST = ["experiment=synthmed_vqa", "trainer.max_steps=6", "trainer.eval_every=3", "trainer.batch_size=4",
        "trainer.val_size=8", "trainer.test_size=8", "trainer.log_every=1", "trainer.max_new_tokens=4",
        "lora.rank=4", "distill.lambda_attn=0.5"]


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    cache = tmp_path_factory.mktemp("medalign_cache")
    record = prepare_mini_synthmed(cache)
    return cache, record


@pytest.fixture()
def cache_env(mini, monkeypatch):
    cache, record = mini
    monkeypatch.setenv("MEDALIGN_CACHE", str(cache))
    return record


def test_compose_resolves_the_prepared_synthmed_paths(cache_env):
    config = compose_config(FAST)
    assert config["model"]["path"] == cache_env["student"]
    assert config["teacher"]["name"] == "local-dir:" + cache_env["teacher"]
    assert config["data"]["train"] == cache_env["data"] + "/train.json"
    assert config["trainer"]["max_steps"] == 6 and config["distill"]["layer"] == 2
    RunSettings.from_config(config).check_paths()


def check(config: dict) -> None:
    RunSettings.from_config(config).check_paths()


@pytest.mark.parametrize(
    "override,message",
    [
        ("distill.layer=4", r"distill.layer=4 is outside the model.*4 decoder layers.*1\.\.3"),
        ("distill.lambda_align=-1", "lambda_align must be >= 0"),
        ("lora.rank=0", "rank must be >= 1"),
        ("+distill.lamda_attn=0.1", r"unknown key distill.lamda_attn; did you mean distill.lambda_attn\?"),
        ("trainer.max_steps=0", "max_steps must be >= 1"),
        ("data.train=/nowhere/train.json", "data.train='/nowhere/train.json' is not a file"),
    ],
)
def test_bad_configs_fail_before_ray_with_the_key_named(cache_env, override, message):
    config = compose_config([*FAST, override])
    with pytest.raises(ConfigError, match=message):
        check(config)


def test_unknown_override_without_plus_is_a_config_error(cache_env):
    with pytest.raises(ConfigError, match="lamda_attn"):
        compose_config([*FAST, "distill.lamda_attn=0.1"])


def test_unprepared_synthmed_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDALIGN_CACHE", str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="medalign prepare data=synthmed"):
        compose_config(FAST)


def _run(config, tmp_path, resume_from=None, name="run"):
    reports = []
    context = RunContext(report=lambda metrics, checkpoint: reports.append((metrics, checkpoint)),
                         resume_from=resume_from, scratch_dir=tmp_path / name)
    final = run_training(config, context)
    return final, reports


@pytest.mark.slow
def test_run_trains_evaluates_checkpoints_and_resumes_exactly(cache_env, tmp_path):
    config = compose_config(FAST)
    final, reports = _run(config, tmp_path)
    steps = [metrics["step"] for metrics, _ in reports]
    assert steps == [1, 2, 3, 4, 5, 6]
    checkpoints = [checkpoint for _, checkpoint in reports if checkpoint is not None]
    assert [c.name for c in checkpoints] == ["checkpoint-000003", "checkpoint-000006"]
    for key in ("train/loss", "train/lm", "train/spatial", "train/attention", "train/lr", "train/grad_norm"):
        assert math.isfinite(final[key])
    assert final["train/spatial"] > 0 and final["train/attention"] > 0
    for key in ("val/closed_accuracy", "val/open_recall", "val/grounding", "test/closed_accuracy", "test/grounding"):
        assert key in final and 0 <= final[key] <= (100 if key.endswith("grounding") else 1)
    assert "test/closed_accuracy" not in reports[2][0]  # test only at the end
    assert 0 < final["perf/outside_loop_share"] < 1 and final["perf/samples_per_s"] > 0
    predictions = json.loads((checkpoints[-1] / "predictions.json").read_text())
    assert len(predictions["val"]) == 8 and len(predictions["test"]) == 8
    state = json.loads((checkpoints[-1] / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["evaluations"] == [3, 6]
    # optimizer/scheduler files load with weights_only=True: no pickled objects
    torch.load(checkpoints[-1] / "optimizer.pt", weights_only=True)
    torch.load(checkpoints[-1] / "scheduler.pt", weights_only=True)

    resumed_final, resumed_reports = _run(config, tmp_path, resume_from=checkpoints[0], name="resumed")
    assert [m["step"] for m, _ in resumed_reports] == [4, 5, 6]
    for key in ("train/loss", "train/spatial", "train/attention", "val/closed_accuracy", "test/closed_accuracy"):
        assert resumed_final[key] == pytest.approx(final[key], rel=1e-5, abs=1e-6), key
    resumed_state = json.loads((resumed_reports[-1][1] / "trainer_state.json").read_text())
    assert resumed_state["evaluations"] == [3, 6]


@pytest.mark.slow
def test_non_finite_loss_stops_the_run_with_a_clear_error(cache_env, tmp_path, monkeypatch):
    from medalign_platform.run import evaluation

    original = evaluation.TargetLookup.__call__

    def poisoned(self, paths, questions=None):
        targets = original(self, paths, questions)
        targets.patch_tokens[:] = float("nan")
        return targets

    monkeypatch.setattr(evaluation.TargetLookup, "__call__", poisoned)
    config = compose_config(FAST)
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step 0"):
        _run(config, tmp_path)


@pytest.mark.slow
def test_report_experiment_scores_bleu_and_rouge(cache_env, tmp_path):
    overrides = ["experiment=synthmed_report", "trainer.max_steps=2", "trainer.eval_every=0", "trainer.batch_size=4",
                 "trainer.val_size=4", "trainer.test_size=4", "trainer.max_new_tokens=6", "lora.rank=4"]
    config = compose_config(overrides)
    assert config["data"]["answer_types"] == ["report"]
    final, _ = _run(config, tmp_path)
    for key in ("val/report_bleu4", "val/report_rouge_l", "test/report_bleu4", "test/report_rouge_l"):
        assert 0.0 <= final[key] <= 1.0, key
    assert final["val/n_report"] == 4 and "val/closed_accuracy" not in final
