"""Which executor a sweep's trials get, and how GPU (fractional ones too) resources reach them; no GPU needed."""

from __future__ import annotations

import json

import pytest
from medalign_platform.run.settings import RunSettings
from medalign_platform.tune.driver import trials_that_fit
from medalign_platform.tune.search_space import load_search_space
from medalign_platform.tune.settings import parse_sweep_request, resolve_executor, resolve_plan
from medalign_platform.tune.trial import trial_base_config, trial_run_config


def plan_for(overrides, config, run_overrides=()):
    request = parse_sweep_request(overrides)
    config = json.loads(json.dumps(config))
    for key, value in run_overrides:
        section, name = key.split(".")
        config[section][name] = value
    return resolve_plan(request, RunSettings.from_config(config), load_search_space("smoke"))


@pytest.mark.parametrize("executor,workers,resources,expected", [
    ("auto", 1, {"CPU": 1}, "inline"),
    ("auto", 1, {"CPU": 1, "GPU": 0}, "inline"),
    ("auto", 1, {"CPU": 1, "GPU": 1}, "train"),
    ("auto", 1, {"CPU": 1, "GPU": 0.5}, "train"),
    ("auto", 2, {"CPU": 1}, "train"),
    ("inline", 1, {"CPU": 1, "GPU": 0.5}, "inline"),  # explicit choices are kept
    ("train", 1, {"CPU": 1}, "train"),
])
def test_auto_is_inline_only_for_single_worker_cpu_trials(executor, workers, resources, expected):
    assert resolve_executor(executor, workers, resources) == expected


def test_gpu_trials_run_on_ray_train_with_their_fractional_gpu(stub_config, tmp_path):
    from medalign_platform.run.ray_train import build_trainer

    plan = plan_for(["sweep.trial_resources={CPU: 2, GPU: 0.5}", f"sweep.output_dir={tmp_path}"], stub_config)
    assert plan.executor == "train" and plan.trial_resources == {"CPU": 2, "GPU": 0.5}
    space = load_search_space("smoke")
    trial = trial_base_config(stub_config, plan, space)
    assert trial["ray"]["use_gpu"] is True and trial["ray"]["resources_per_worker"] == {"CPU": 2, "GPU": 0.5}
    run = RunSettings.from_config(trial_run_config(trial, tmp_path / "trial_0"))
    scaling = build_trainer(run).scaling_config  # what Ray Train will request per worker
    assert scaling.use_gpu is True and scaling.num_workers == 1
    assert scaling.resources_per_worker == {"CPU": 2.0, "GPU": 0.5}


def test_a_gpu_run_config_makes_gpu_trials_without_sweep_resources(stub_config, tmp_path):
    plan = plan_for([f"sweep.output_dir={tmp_path}"], stub_config, [("ray.use_gpu", True)])
    assert plan.trial_resources == {"CPU": 1.0, "GPU": 1} and plan.executor == "train"
    cpu_plan = plan_for([f"sweep.output_dir={tmp_path}"], stub_config)
    assert cpu_plan.trial_resources == {"CPU": 1.0} and cpu_plan.executor == "inline"


@pytest.mark.parametrize("resources,available,workers,expected", [
    ({"CPU": 1, "GPU": 0.5}, {"CPU": 16, "GPU": 1}, 1, 2),     # two trials share the GPU
    ({"CPU": 1, "GPU": 0.25}, {"CPU": 16, "GPU": 1}, 1, 4),
    ({"CPU": 1, "GPU": 0.1}, {"CPU": 16, "GPU": 1}, 1, 8),     # capped at max_concurrent
    ({"CPU": 4, "GPU": 0.5}, {"CPU": 6, "GPU": 2}, 1, 1),      # CPUs bind first
    ({"CPU": 1, "GPU": 0.5}, {"CPU": 16, "GPU": 2}, 2, 2),     # 2 DDP workers per trial
    ({"CPU": 1, "GPU": 1}, {"CPU": 16}, 1, 0),                 # no GPU in the cluster
])
def test_fractional_gpus_fit_several_trials_per_gpu(stub_config, tmp_path, resources, available, workers, expected):
    overrides = [f"sweep.trial_resources={json.dumps(resources).replace(chr(34), '')}", "sweep.max_concurrent=8",
                 f"sweep.num_workers={workers}", f"sweep.output_dir={tmp_path}"]
    plan = plan_for(overrides, stub_config)
    assert trials_that_fit(plan, available) == expected
