"""``medalign ablate-layers``: argument checks, per-layer aggregation, the outputs, and a real
layers x seeds grid run through ``run_sweep`` on a mini SynthMed (Ray Tune, inline trials)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import NO_RAY_DASHBOARD
from ray_cluster import trial_pids
from medalign_platform.tune.ablation import (
    ablate_command,
    parse_ablation_args,
    plan_ablation,
    run_ablation,
    write_grid_file,
)
from medalign_platform.tune.ablation_report import (
    aggregate,
    correlation,
    describe,
    grounding_vs_metric,
    markdown_table,
    summarize_ablation,
    write_outputs,
)
from medalign_platform.common.errors import ConfigError
from medalign_platform.tune.search_space import SearchSpaceError, load_search_space

MAX_STEPS = 4
TINY = ["experiment=synthmed_vqa", f"trainer.max_steps={MAX_STEPS}", "trainer.eval_every=4", "trainer.val_size=6",
        "trainer.test_size=6", "trainer.batch_size=4", "trainer.log_every=2", "trainer.max_new_tokens=3",
        NO_RAY_DASHBOARD]


@pytest.fixture(scope="module")
def mini_cache(tmp_path_factory):
    """A prepared mini SynthMed (untrained 4-layer student), with ``MEDALIGN_CACHE`` pointing at it."""
    from synthmed_fixtures import mini_synthmed_env

    cache = tmp_path_factory.mktemp("ablation_cache")
    with mini_synthmed_env(cache):
        yield cache


def record(trial_id, layer, seed, status="TERMINATED", step=MAX_STEPS, **metrics):
    return {"trial_id": trial_id, "status": status, "params": {"distill.layer": layer, "trainer.seed": seed},
            "metrics": {"step": step, **metrics}, "config": {"trainer": {"max_steps": MAX_STEPS}}}


# 3 layers x 3 seeds: layer 1 complete, layer 2 one finished seed (one running, one errored),
# layer 3 finished but with grounding missing on one seed and a trial stopped early.
SYNTHETIC = [
    record("a", 1, 0, **{"val/closed_accuracy": 0.5, "val/grounding": 1.2, "val/open_recall": 0.1,
                         "test/closed_accuracy": 0.4}),
    record("b", 1, 1, **{"val/closed_accuracy": 0.6, "val/grounding": 1.4, "val/open_recall": 0.2}),
    record("c", 1, 2, **{"val/closed_accuracy": 0.7, "val/grounding": 1.9, "val/open_recall": 0.3}),
    record("d", 2, 0, **{"val/closed_accuracy": 0.9, "val/grounding": 2.0, "val/open_recall": 0.5}),
    record("e", 2, 1, status="RUNNING", step=2, **{"val/closed_accuracy": 0.99}),
    record("f", 2, 2, status="ERROR", step=2, **{"val/closed_accuracy": 0.99}),
    record("g", 3, 0, **{"val/closed_accuracy": 0.2, "val/open_recall": 0.0}),
    record("h", 3, 1, **{"val/closed_accuracy": 0.4, "val/grounding": 0.8, "val/open_recall": 0.0}),
    record("i", 3, 2, step=2, **{"val/closed_accuracy": 0.99}),  # TERMINATED before max_steps: not counted
]


# --------------------------------------------------------------------------- aggregation (fast)


def test_aggregation_gives_exact_means_sample_stds_and_counts():
    result = aggregate(SYNTHETIC, [1, 2, 3], [0, 1, 2], "val/closed_accuracy")
    assert result["columns"] == ["val/closed_accuracy", "val/grounding", "val/open_recall", "test/closed_accuracy"]
    rows = {row["layer"]: row["stats"] for row in result["rows"]}
    one = rows[1]["val/closed_accuracy"]
    assert one["mean"] == pytest.approx(0.6, abs=1e-15) and one["std"] == pytest.approx(0.1, abs=1e-15)
    assert one["n"] == 3 and [v["seed"] for v in one["values"]] == [0, 1, 2]
    assert rows[1]["val/grounding"]["std"] == pytest.approx(float(np.std([1.2, 1.4, 1.9], ddof=1)), rel=1e-15)
    assert rows[2]["val/closed_accuracy"] == {"mean": 0.9, "std": 0.0, "n": 1,
                                              "values": [{"seed": 0, "value": 0.9, "trial_id": "d"}]}
    assert rows[3]["val/closed_accuracy"]["mean"] == pytest.approx(0.3) and rows[3]["val/closed_accuracy"]["n"] == 2
    assert rows[3]["val/grounding"] == {"mean": 0.8, "std": 0.0, "n": 1,
                                        "values": [{"seed": 1, "value": 0.8, "trial_id": "h"}]}
    assert rows[1]["test/closed_accuracy"]["n"] == 1 and rows[2]["test/closed_accuracy"]["n"] == 0
    assert result["best_layer"] == 2
    assert result["cells"] == {"expected": 9, "finished": 6, "duplicates": 0, "missing": [
        {"layer": 2, "seed": 1, "status": "RUNNING"}, {"layer": 2, "seed": 2, "status": "ERROR"},
        {"layer": 3, "seed": 2, "status": "TERMINATED"}]}
    assert aggregate(SYNTHETIC, [1, 2, 3], [0, 1, 2], "val/closed_accuracy", mode="min")["best_layer"] == 3


def test_correlation_values_ties_and_undefined_cases():
    assert correlation([1, 2, 3, 4], [2, 4, 6, 8]) == {"pearson": pytest.approx(1.0), "spearman": pytest.approx(1.0),
                                                      "n": 4}
    monotone = correlation([1, 2, 3, 10], [1, 2, 3, 4])   # rank-perfect, not linear
    assert monotone["spearman"] == pytest.approx(1.0) and monotone["pearson"] < 0.95
    # Ties share their mean rank: ranks of x are (0.5, 0.5, 2), of y (0, 1, 2).
    tied = correlation([1, 1, 2], [1, 2, 3])
    assert tied["spearman"] == pytest.approx(float(np.corrcoef([0.5, 0.5, 2], [0, 1, 2])[0, 1]))
    assert correlation([1, None, 2, float("nan"), 3], [3, 1, 2, 0, 1]) == {
        "pearson": pytest.approx(-1.0), "spearman": pytest.approx(-1.0), "n": 3}
    assert correlation([1, 2], [1, 2]) == {"pearson": None, "spearman": None, "n": 2}
    assert correlation([5, 5, 5], [1, 2, 3])["pearson"] is None


def test_grounding_correlations_across_finished_trials_per_split():
    trials = [record(str(i), 1 + i % 3, i, **{"val/closed_accuracy": acc, "val/grounding_layer": acc * 10,
                                              "val/grounding": 99.0, "val/grounding_answer": -acc,
                                              "val/grounding_answer_l10": 1.0, "val/grounding_answer_l2": acc,
                                              "val/grounding_answer_l1h0": acc, "test/closed_accuracy": acc,
                                              "test/pointing_answer": 1 - acc})
              for i, acc in enumerate([0.5, 0.7, 0.6, 0.9])]
    val, test = grounding_vs_metric(trials, "val/closed_accuracy")
    assert val["metric"] == "val/closed_accuracy" and val["trials"] == 4
    # grounding_layer wins over its old name; per-layer reads in layer order; no per-head keys.
    assert list(val["correlations"]) == ["val/grounding_layer", "val/grounding_answer", "val/grounding_answer_l2",
                                         "val/grounding_answer_l10"]
    assert val["correlations"]["val/grounding_layer"]["pearson"] == pytest.approx(1.0)
    assert val["correlations"]["val/grounding_answer"]["spearman"] == pytest.approx(-1.0)
    assert val["correlations"]["val/grounding_answer_l10"]["pearson"] is None   # constant
    assert test["metric"] == "test/closed_accuracy"
    assert test["correlations"] == {"test/pointing_answer": {"pearson": pytest.approx(-1.0),
                                                             "spearman": pytest.approx(-1.0), "n": 4}}
    result = aggregate(trials, [1, 2, 3], [0, 1, 2, 3], "val/closed_accuracy")
    assert result["grounding_vs_metric"] == [val, test]
    text = markdown_table(result)
    assert ("Grounding vs val/closed_accuracy across the 4 finished trials (Pearson / Spearman; the trials differ "
            "in layer too): val/grounding_layer +1.00 / +1.00, val/grounding_answer -1.00 / -1.00") in text
    assert "val/grounding_answer_l10 n/a / n/a" in text


def test_describe_uses_ddof_1_and_zero_spread_for_one_value():
    assert describe([1.0, 2.0, 4.0]) == {"mean": pytest.approx(7 / 3), "std": pytest.approx(math.sqrt(7 / 3)),
                                         "n": 3}
    assert describe([0.25]) == {"mean": 0.25, "std": 0.0, "n": 1}
    assert describe([]) == {"mean": None, "std": None, "n": 0}


def test_table_csv_png_and_tensorboard_from_synthetic_records(tmp_path):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = aggregate(SYNTHETIC, [1, 2, 3], [0, 1, 2], "val/closed_accuracy")
    files = write_outputs(result, tmp_path)
    markdown = Path(files["markdown"]).read_text()
    assert markdown == markdown_table(result)
    assert "| 1 | 0.6000 ± 0.1000 (3) |" in markdown and "| **2** (best) | 0.9000 ± 0.0000 (1) |" in markdown
    assert "n=1 (layers [2])" in markdown and "layer 2 seed 1 (RUNNING)" in markdown
    rows = list(csv.DictReader(Path(files["csv"]).read_text().splitlines()))
    assert [r["layer"] for r in rows] == ["1", "2", "3"]
    assert float(rows[0]["val/closed_accuracy_std"]) == result["rows"][0]["stats"]["val/closed_accuracy"]["std"]
    assert rows[1]["test/closed_accuracy_mean"] == "" and rows[1]["test/closed_accuracy_n"] == "0"
    assert json.loads(Path(files["json"]).read_text())["best_layer"] == 2
    with Image.open(files["png"]) as image:
        assert image.format == "PNG" and image.width > 500
    events = EventAccumulator(files["tensorboard"], size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    events.Reload()
    means = events.Scalars("ablation/val/closed_accuracy/mean")
    assert [(e.step, round(e.value, 6)) for e in means] == [(1, 0.6), (2, 0.9), (3, 0.3)]
    assert [e.step for e in events.Scalars("ablation/test/closed_accuracy/mean")] == [1]  # n=0 layers left out


def test_summary_of_an_ablation_with_no_finished_trial_reports_every_cell_missing(tmp_path):
    (tmp_path / "ablation").mkdir()
    (tmp_path / "ablation" / "spec.json").write_text(json.dumps(
        {"layers": [1, 2], "seeds": [0], "metric": "val/closed_accuracy", "mode": "max"}))
    result = summarize_ablation(tmp_path)  # killed before Tune saved anything: no state, no summary.json
    assert result["best_layer"] is None and result["cells"]["finished"] == 0
    assert [m["status"] for m in result["cells"]["missing"]] == ["NOT STARTED", "NOT STARTED"]
    assert "| 1 | – (0) | – (0) | – (0) |" in result["markdown"]
    assert all(Path(path).exists() for path in result["files"].values())
    with pytest.raises(ConfigError, match="not an ablation folder"):
        summarize_ablation(tmp_path / "elsewhere")


# --------------------------------------------------------------------------- arguments (fast)


def test_arguments_split_into_grid_options_and_run_overrides():
    request = parse_ablation_args(["experiment=synthmed_vqa", "layers=[1,3]", "seeds=[4,5]", "trainer.max_steps=4",
                                   "ablation.metric=val/grounding", "ablation.executor=inline", "resume=true",
                                   "sweep.verbose=0"])
    assert (request.layers, request.seeds, request.resume) == ([1, 3], [4, 5], True)
    assert request.options == {"metric": "val/grounding", "executor": "inline"}
    assert request.sweep_options == {"verbose": 0}
    assert request.config_overrides == ["experiment=synthmed_vqa", "trainer.max_steps=4"]
    assert parse_ablation_args(["layers=2"]).layers == [2] and parse_ablation_args(["layers=[2]"]).seeds is None
    # no ASHA in a grid, so actor reuse may pass through (a sweep with ASHA refuses it)
    assert parse_ablation_args(["layers=[1]", "sweep.reuse_actors=true"]).sweep_options == {"reuse_actors": True}


@pytest.mark.parametrize("overrides, match", [
    (["layers=[]"], r"layers must be a non-empty list of integers"),
    (["layers=[1,2]", "seeds=[0,1.5]"], r"seeds must hold integers only.*\[1\.5\]"),
    (["layers=[1,2]", "seeds=[a,b]"], r"seeds must hold integers only.*\['a', 'b'\]"),
    (["layers=[1,1]"], r"repeats a value"),
    (["layers=[1]", "ablation.metrc=x"], r"unknown key ablation.metrc"),
    (["layers=[1]", "distill.layer=2"], r"pass layers=\[...\] instead"),
    (["layers=[1]", "trainer.seed=2"], r"pass seeds=\[...\] instead"),
    (["layers=[1]", "sweep.sampler=tpe"], r"sets this itself \(grid sampler"),
    (["layers=[1]", "sweep.name=x"], r"name, output_dir, metric, mode, max_concurrent and executor are ablation"),
    (["layers=[1]", "search=smoke"], r"drop search="),
])
def test_bad_arguments_are_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        parse_ablation_args(overrides)


def test_generated_grid_loads_as_a_search_space_from_its_path(tmp_path):
    path = write_grid_file(tmp_path / "grid" / "layers_seeds.yaml", [1, 3], [0, 1, 2])
    space = load_search_space(str(path))
    assert space.source == str(path.resolve()) and space.grid_size() == 6
    assert [list(space.params[k].values) for k in ("distill.layer", "trainer.seed")] == [[1, 3], [0, 1, 2]]


def test_layer_outside_the_model_fails_before_ray_with_the_valid_range(mini_cache, tmp_path, capsys):
    import ray

    overrides = [*TINY, "layers=[1,4]", f"ablation.output_dir={tmp_path}"]
    with pytest.raises(SearchSpaceError, match=r"4 decoder layers, so distill.layer must be in 1\.\.3"):
        run_ablation(overrides)
    assert ablate_command(overrides) == 2
    assert "distill.layer must be in 1..3" in capsys.readouterr().err
    assert not ray.is_initialized() and not any(tmp_path.iterdir())  # nothing started, nothing written


def test_plan_checks_metric_and_missing_layers(mini_cache, tmp_path):
    with pytest.raises(ConfigError, match=r"needs layers=\[...\]"):
        plan_ablation(parse_ablation_args([*TINY, f"ablation.output_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match=r"test metrics need trainer.test_size>0"):
        plan_ablation(parse_ablation_args([*TINY, "trainer.test_size=0", "layers=[1]",
                                           "ablation.metric=test/closed_accuracy", "ablation.allow_test_selection=true"]))
    with pytest.raises(ConfigError, match=r"ablation.metric=test/closed_accuracy picks the best layer on the test "
                                          r"split.*ablation.allow_test_selection=true"):
        plan_ablation(parse_ablation_args([*TINY, "layers=[1]", "ablation.metric=test/closed_accuracy"]))
    with pytest.raises(ConfigError, match=r"ablation.executor must be one of 'auto', 'train', 'inline'"):
        plan_ablation(parse_ablation_args([*TINY, "layers=[1]", "ablation.executor=spark",
                                           f"ablation.output_dir={tmp_path}"]))
    assert not any(tmp_path.iterdir())
    plan = plan_ablation(parse_ablation_args([*TINY, "layers=[1,3]", "ablation.metric=test/closed_accuracy",
                                              "ablation.allow_test_selection=true", f"ablation.output_dir={tmp_path}",
                                              "ablation.name=x"]))
    assert plan.seeds == [0, 1, 2] and plan.experiment_dir == tmp_path.resolve() / "x"
    options = plan.sweep.options
    assert (options.sampler, options.num_samples, options.asha.enabled) == ("grid", 6, False)
    assert options.metric == "val/closed_accuracy"  # Tune drives on the val twin


# --------------------------------------------------------------------------- a real ablation


@pytest.fixture(scope="module")
def real_ablation(mini_cache, tmp_path_factory):
    import ray

    out = tmp_path_factory.mktemp("ablation_runs")
    try:
        result = run_ablation([*TINY, "layers=[1,3]", "seeds=[0,1]", "ablation.executor=inline",
                               "ablation.max_concurrent=2", "ablation.name=grid", f"ablation.output_dir={out}",
                               "sweep.verbose=0", "sweep.reuse_actors=true"])  # no faults here: 2 actor starts, not 4
    finally:
        ray.shutdown()
    return result, out / "grid"


@pytest.mark.slow
def test_real_ablation_runs_every_cell_and_tables_the_trial_records(real_ablation):
    result, experiment = real_ablation
    assert result["sweep"]["trials"] == {"TERMINATED": 4} and result["cells"]["finished"] == 4
    records = json.loads((experiment / "summary.json").read_text())["records"]
    cells = {(r["params"]["distill.layer"], r["params"]["trainer.seed"]) for r in records}
    assert cells == {(1, 0), (1, 1), (3, 0), (3, 1)}
    assert all(r["metrics"]["step"] == MAX_STEPS for r in records)
    # sweep.reuse_actors passed through: later cells ran in earlier cells' actors (2 at a time: 2
    # processes as a rule; fewer than 4 is what reuse guarantees)
    pids = trial_pids(records)
    assert len(pids) < 4, pids
    assert result["columns"] == ["val/closed_accuracy", "val/grounding", "val/open_recall", "test/closed_accuracy",
                                 "test/grounding", "test/open_recall"]
    saved = json.loads((experiment / "ablation" / "ablation.json").read_text())
    table = list(csv.DictReader((experiment / "ablation" / "ablation.csv").read_text().splitlines()))
    for index, layer in enumerate([1, 3]):
        for column in result["columns"]:
            values = [r["metrics"][column] for r in records if r["params"]["distill.layer"] == layer]
            stat = saved["rows"][index]["stats"][column]
            assert stat["n"] == 2 and stat["mean"] == pytest.approx(float(np.mean(values)), rel=1e-12, abs=1e-15)
            assert stat["std"] == pytest.approx(float(np.std(values, ddof=1)), rel=1e-12, abs=1e-15)
            assert float(table[index][f"{column}_mean"]) == stat["mean"]
    assert (experiment / "ablation" / "ablation.md").read_text() == result["markdown"]


@pytest.mark.slow
def test_real_ablation_plot_and_tensorboard(real_ablation):
    import matplotlib.image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result, experiment = real_ablation
    png = experiment / "ablation" / "ablation.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    pixels = matplotlib.image.imread(png)
    assert pixels.ndim == 3 and pixels.shape[0] > 300 and pixels.shape[1] > 600
    again = summarize_ablation(experiment)  # rebuilt from the folder: same table, TensorBoard not doubled
    assert again["markdown"] == result["markdown"]
    events = EventAccumulator(str(experiment / "ablation" / "tensorboard"),
                              size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    events.Reload()
    (image,) = events.Images("ablation/plot")
    assert (image.width, image.height) == (pixels.shape[1], pixels.shape[0])
    (text,) = events.Tensors("ablation/table/text_summary")
    assert text.tensor_proto.string_val[0].decode() == result["markdown"]
    for column in ("val/closed_accuracy", "val/grounding"):
        for kind in ("mean", "std"):
            scalars = events.Scalars(f"ablation/{column}/{kind}")
            expected = [(row["layer"], row["stats"][column][kind]) for row in result["rows"]]
            assert [e.step for e in scalars] == [1, 3]
            assert [e.value for e in scalars] == pytest.approx([v for _, v in expected], rel=1e-6, abs=1e-7)
