"""Search space files: parsing, Ray Tune domains, validation against the run config and the model."""

from __future__ import annotations

import json
import textwrap

import pytest
import yaml
from medalign_platform.tune.search_space import (
    SearchSpaceError,
    load_search_space,
    parse_search_space,
    search_spaces_dir,
)

DEPTH = 4  # the tiny SynthMed student's decoder layers


@pytest.fixture(scope="module")
def base_config(tmp_path_factory):
    """The composed synthmed_vqa run config (paths from a stub prepared.json: nothing is loaded)."""
    from medalign_platform.run.compose import compose_config

    cache = tmp_path_factory.mktemp("cache")
    root = cache / "synthmed"
    root.mkdir()
    (root / "prepared.json").write_text(json.dumps(
        {"data": str(root / "data"), "teacher": str(root / "teacher"), "student": str(root / "student"),
         "cache": str(root)}))
    patch = pytest.MonkeyPatch()
    patch.setenv("MEDALIGN_CACHE", str(cache))
    try:
        yield compose_config(["experiment=synthmed_vqa"])
    finally:
        patch.undo()


def flatten(nested: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in nested.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def tune_domains(space) -> dict:
    """Nested ``{"distill": {"layer": <Tune domain>}}`` of a space's entries."""
    from medalign_platform.common.keys import unflatten

    return unflatten({key: param.to_tune() for key, param in space.params.items()})


def space_from(text: str, tmp_path, name: str = "space"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(text))
    return load_search_space(str(path)), path


# --------------------------------------------------------------------------- shipped files


@pytest.mark.parametrize("name", ["medalign_default", "smoke", "layers_grid"])
def test_shipped_search_spaces_parse_and_validate(name, base_config):
    space = load_search_space(name)
    assert space.source == str(search_spaces_dir() / f"{name}.yaml")
    space.validate(base_config, depth=DEPTH)
    for point in space.seed_points(base_config):
        assert set(point) == {key.replace(".", "/") for key in space.sampled_keys}


def test_default_space_has_the_documented_entries_and_the_scaled_original_recipe(base_config):
    from ray.tune.search.sample import Categorical, Float, Integer

    space = load_search_space("medalign_default")
    domains = tune_domains(space)
    assert isinstance(domains["distill"]["lambda_align"], Float)
    assert isinstance(domains["distill"]["layer"], Integer)
    assert isinstance(domains["lora"]["rank"], Categorical)
    assert domains["distill"]["steer"]["mode"].categories == ["off", "full", "low_rank"]
    assert space.rules["lora.alpha"].source == "lora.rank"
    original = space.seed_points(base_config)[0]
    assert original["distill/layer"] == 2 and original["distill/lambda_align"] == 1.0
    assert original["distill/lambda_attn"] == 0.06 and original["distill/attention_normalize"] == "l2"


def test_tune_domains_follow_the_entry_types(tmp_path):
    from ray import tune
    from ray.tune.search.sample import Categorical, Float, Integer

    space, _ = space_from("""
        distill.lambda_align: {type: loguniform, low: 0.01, high: 2.0}
        distill.lambda_attn: {type: uniform, low: 0.0, high: 0.5, step: 0.05}
        distill.layer: {type: int, low: 1, high: 3}
        lora.rank: {type: int, low: 4, high: 16, step: 4}
        trainer.max_steps: {type: int, low: 10, high: 1000, log: true}
        distill.attention_normalize: {type: choice, values: [probability, l2]}
        optim.lr: {type: grid, values: [1.0e-4, 2.0e-4]}
        lora.dropout: {type: fixed, value: 0.1}
    """, tmp_path)
    domains = tune_domains(space)
    align = domains["distill"]["lambda_align"]
    assert isinstance(align, Float) and (align.lower, align.upper) == (0.01, 2.0)
    assert "LogUniform" in type(align.get_sampler()).__name__
    assert "Quantized" in type(domains["distill"]["lambda_attn"].get_sampler()).__name__
    layers = domains["distill"]["layer"]
    assert isinstance(layers, Integer)
    drawn = set(layers.sample(size=300, random_state=0))
    assert drawn == {1, 2, 3}, "int bounds are inclusive"
    assert set(domains["lora"]["rank"].sample(size=300, random_state=0)) == {4, 8, 12, 16}
    assert isinstance(domains["distill"]["attention_normalize"], Categorical)
    assert domains["optim"]["lr"] == tune.grid_search([1.0e-4, 2.0e-4])
    assert domains["lora"]["dropout"] == 0.1
    # An Optuna searcher takes the grid entry as a categorical.
    assert isinstance(space.params["optim.lr"].to_optuna_domain(), Categorical)
    assert space.has_grid


# --------------------------------------------------------------------------- errors


def test_layer_range_outside_the_model_names_the_valid_range(tmp_path, base_config):
    space, path = space_from("distill.layer: {type: int, low: 1, high: 5}\n", tmp_path)
    with pytest.raises(SearchSpaceError) as error:
        space.validate(base_config, depth=DEPTH)
    message = str(error.value)
    assert "1..3" in message and str(path) in message and "distill.layer" in message and "4 decoder layers" in message
    zero, _ = space_from("distill.layer: {type: choice, values: [0, 2]}\n", tmp_path, "zero")
    with pytest.raises(SearchSpaceError, match=r"1\.\.3"):
        zero.validate(base_config, depth=DEPTH)


def test_layer_range_is_read_from_the_model_when_depth_is_not_given(tmp_path, base_config):
    from medalign_platform.synthmed.tiny_student import tiny_student

    student = tiny_student(tmp_path / "student", num_layers=3)
    config = {**base_config, "model": {**base_config["model"], "path": str(student)}}
    space, _ = space_from("distill.layer: {type: int, low: 1, high: 3}\n", tmp_path)
    with pytest.raises(SearchSpaceError, match=r"must be in 1\.\.2"):
        space.validate(config)


@pytest.mark.parametrize("entry, match", [
    ("{type: normal, low: 0, high: 1}", r"unknown type 'normal'.*valid types"),
    ("{type: loguniform, low: 2.0, high: 0.1}", r"low \(2.0\) > high \(0.1\)"),
    ("{type: int, low: 3, high: 1}", r"low \(3\) > high \(1\)"),
    ("{type: loguniform, low: 0.0, high: 1.0}", r"loguniform needs low > 0"),
    ("{type: uniform, low: 0.1, high: 1.0, q: 0.1}", r"unknown key\(s\) \['q'\] for type uniform"),
    ("{type: choice, values: []}", r"values must be a non-empty list"),
    ("{type: choice}", r"type choice needs \['values'\]"),
    ("{type: int, low: 1.5, high: 3}", r"integer low"),
    ("{type: uniform, low: 0.0, high: 1.0, step: 0.3}", r"not a multiple of step"),
    ("0.5", r"must be a mapping"),
    ("{rule: 'alpha^2'}", r"rule 'alpha\^2' is not of the form"),
])
def test_bad_entries_name_the_file_and_the_entry(entry, match, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(f"distill.lambda_align: {entry}\n")
    with pytest.raises(SearchSpaceError, match=match) as error:
        load_search_space(str(path))
    assert str(path) in str(error.value) and "distill.lambda_align" in str(error.value)


@pytest.mark.parametrize("text, match", [
    ("distill.lambda_algn: {type: loguniform, low: 0.1, high: 1.0}",
     r"distill.lambda_algn: unknown config key.*distill.lambda_align"),
    ("run.name: {type: choice, values: [a, b]}", r"section 'run' cannot be searched"),
    ("distill.layer: {type: loguniform, low: 1.0, high: 3.0}", r"integer setting.*use type int"),
    ("distill.attention_normalize: {type: uniform, low: 0.0, high: 1.0}", r"str setting.*use type choice"),
    ("distill.steer.mode: {type: choice, values: [off, full]}", r"quote the value"),
    ("distill.attention_normalize: {type: choice, values: [probability, kl]}",
     r"rejected by the run config.*attention_normalize"),
    ("optim.warmup_ratio: {type: uniform, low: 0.0, high: 1.5}", r"rejected by the run config.*warmup_ratio"),
    ("lora.rank: {type: choice, values: [4, 8]}\nlora.alpha: {rule: 2*ranks}",
     r"lora.ranks, which is not a config key"),
])
def test_values_the_run_config_would_reject_fail_before_launch(text, match, tmp_path, base_config):
    space, path = space_from(text + "\n", tmp_path)
    with pytest.raises(SearchSpaceError, match=match) as error:
        space.validate(base_config, depth=DEPTH)
    assert str(path) in str(error.value)


def test_missing_file_lists_the_available_spaces():
    with pytest.raises(SearchSpaceError, match=r"available search spaces: \[.*'smoke'"):
        load_search_space("no_such_space")


def test_reserved_and_malformed_keys(tmp_path):
    with pytest.raises(SearchSpaceError, match="flat config keys"):
        parse_search_space({"layer": {"type": "int", "low": 1, "high": 3}}, "f.yaml")
    with pytest.raises(SearchSpaceError, match="nothing to search"):
        parse_search_space({"lora.dropout": {"type": "fixed", "value": 0.1}}, "f.yaml")
    with pytest.raises(SearchSpaceError, match=r"points_to_evaluate\[0\] nests"):
        parse_search_space({"distill.layer": {"type": "int", "low": 1, "high": 3},
                            "points_to_evaluate": [{"distill": {"layer": 2}}]}, "f.yaml")


# --------------------------------------------------------------------------- rules and points


def test_alpha_rule_follows_the_sampled_rank(tmp_path, base_config):
    space, _ = space_from("""
        lora.rank: {type: choice, values: [4, 8, 16]}
        lora.alpha: {rule: "2*rank"}
        distill.lambda_attn: {type: loguniform, low: 0.01, high: 0.1}
        distill.lambda_align: {rule: "distill.lambda_attn*10"}
    """, tmp_path)
    space.validate(base_config, depth=DEPTH)
    before = json.dumps(base_config, sort_keys=True)
    config = space.apply_rules({**base_config, "lora": {**base_config["lora"], "rank": 4}})
    assert config["lora"]["alpha"] == 8 and isinstance(config["lora"]["alpha"], int)
    assert config["distill"]["lambda_align"] == pytest.approx(10 * base_config["distill"]["lambda_attn"])
    assert json.dumps(base_config, sort_keys=True) == before  # not modified in place


def test_seed_points_are_completed_from_the_base_config_and_flattened(tmp_path, base_config):
    space, _ = space_from("""
        distill.layer: {type: int, low: 1, high: 3}
        distill.lambda_align: {type: loguniform, low: 0.01, high: 2.0}
        distill.steer.mode: {type: choice, values: ["off", low_rank]}
        points_to_evaluate:
          - {distill.layer: 3}
          - {distill.layer: 1, distill.lambda_align: 0.5, distill.steer.mode: low_rank}
    """, tmp_path)
    space.validate(base_config, depth=DEPTH)
    assert space.seed_points(base_config) == [
        {"distill/layer": 3, "distill/lambda_align": 1.0, "distill/steer/mode": "off"},
        {"distill/layer": 1, "distill/lambda_align": 0.5, "distill/steer/mode": "low_rank"},
    ]


@pytest.mark.parametrize("points, match", [
    ("[{distill.layer: 7}]", r"points_to_evaluate\[0\] sets distill.layer=7, outside the entry"),
    ("[{lora.rank: 8}]", r"points_to_evaluate\[0\] sets lora.rank, which is not searched"),
    ("[{distill.layer: 2}]", r"leaves out .*lora.alpha|leaves out"),
])
def test_bad_seed_points_are_errors(points, match, tmp_path, base_config):
    extra = "lora.alpha: {type: choice, values: [4, 8]}\n" if "leaves" in match else ""
    space, path = space_from(f"distill.layer: {{type: int, low: 1, high: 3}}\n{extra}points_to_evaluate: {points}\n",
                             tmp_path)
    with pytest.raises(SearchSpaceError, match=match) as error:
        space.validate(base_config, depth=DEPTH)
    assert str(path) in str(error.value)


def test_optuna_search_suggests_the_flattened_seed_points_first(tmp_path, base_config):
    """Ray's OptunaSearch names a nested space's parameters ``distill/layer``; the seed points
    must use those names, or the study enqueues them and then silently never uses them."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    space = load_search_space("medalign_default")
    points = space.seed_points(base_config)
    searcher = OptunaSearch(metric="val/closed_accuracy", mode="max", points_to_evaluate=points,
                            sampler=optuna.samplers.TPESampler(seed=0))
    searcher.set_search_properties("val/closed_accuracy", "max", space.param_space(base_config))
    for index, point in enumerate(points):
        assert flatten(searcher.suggest(f"t{index}")) == point
    assert searcher.suggest("t_next") != searcher.suggest("t_next2")


def test_search_space_record_round_trips_through_yaml(tmp_path):
    space = load_search_space("medalign_default")
    again = parse_search_space(yaml.safe_load(yaml.safe_dump(space.to_dict())), "again.yaml")
    assert again.params == space.params and again.rules == space.rules and again.points == space.points


def test_teacher_attention_and_token_weights_are_searchable(tmp_path, base_config):
    space, _ = space_from("""
        teacher.attention: {type: choice, values: [cls, prompt_aware]}
        distill.token_weights: {type: choice, values: [none, teacher_attention]}
    """, tmp_path)
    space.validate(base_config, depth=DEPTH)
    assert set(space.sampled_keys) == {"teacher.attention", "distill.token_weights"}
    bad, _ = space_from("teacher.attention: {type: choice, values: [cls, patches]}", tmp_path, "bad")
    with pytest.raises(SearchSpaceError, match="teacher.attention"):
        bad.validate(base_config, depth=DEPTH)
    other, _ = space_from("teacher.name: {type: choice, values: [a, b]}", tmp_path, "other")
    with pytest.raises(SearchSpaceError, match="cannot be searched"):
        other.validate(base_config, depth=DEPTH)


def test_teacher_max_normalize_is_refused_as_display_only(tmp_path, base_config):
    space, _ = space_from("distill.teacher_max_normalize: {type: choice, values: [true, false]}", tmp_path)
    with pytest.raises(SearchSpaceError, match="display-only"):
        space.validate(base_config, depth=DEPTH)
