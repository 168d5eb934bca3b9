"""The no-weights preflight (run/preflight.py): 7B shapes on the meta device against the
published parameter counts, the memory estimate against measured peaks, the trial-size check,
and the config problems ``medalign check`` names."""

from __future__ import annotations

import copy
import json

import pytest
from real_configs import (
    LLAVA_15_7B_HF,
    LLAVA_15_7B_PARAMS,
    LLAVA_INTERLEAVE_QWEN_05B_HF,
    LLAVA_INTERLEAVE_QWEN_05B_PARAMS_APPROX,
    LLAVA_MED_15_MISTRAL_7B,
    LLAVA_MED_15_PARAMS,
    MISTRAL_7B_PARAMS,
    llava_med_converted_config,
)
from real_formats import tiny_biomedclip, tiny_pubmedclip, tiny_unimed_pt

from medalign_platform.core.student import LoraSettings
from medalign_platform.run.compose import ConfigError
from medalign_platform.run.preflight import (
    check_trial_fits,
    estimate_memory,
    parse_gpus,
    run_preflight,
    student_config,
    teacher_layout,
)

R64 = LoraSettings(rank=64, alpha=16, dropout=0.05)
TOKENS = 674  # 576 image tokens + 98 text tokens: the step-benchmark shape of method.md


def _config_only(tmp_path, name, config) -> str:
    """A model folder holding only config.json: the preflight must not need weights."""
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


@pytest.fixture(scope="module")
def llava15(tmp_path_factory):
    return student_config(_config_only(tmp_path_factory.mktemp("m"), "llava-1.5-7b-hf", LLAVA_15_7B_HF))


@pytest.fixture(scope="module")
def llava_med(tmp_path_factory):
    return student_config(_config_only(tmp_path_factory.mktemp("m"), "llava-med-hf", llava_med_converted_config()))


def test_meta_device_7b_shapes_have_the_published_parameter_counts(llava15, llava_med, tmp_path):
    assert estimate_memory(llava15, lora=R64, batch_size=1, seq_len=TOKENS).params_total == LLAVA_15_7B_PARAMS
    med = estimate_memory(llava_med, lora=R64, batch_size=1, seq_len=TOKENS)
    # The converted model has 64 more embedding and lm_head rows (<image> + padding to a multiple of 64).
    assert med.params_total == LLAVA_MED_15_PARAMS + 2 * 64 * 4096
    from medalign_platform.run.memory import build_meta_model

    language = sum(p.numel() for n, p in build_meta_model(llava_med).named_parameters()
                   if "language_model" in n or n.startswith("lm_head"))
    assert language == MISTRAL_7B_PARAMS + 2 * 64 * 4096
    qwen = student_config(_config_only(tmp_path, "interleave", LLAVA_INTERLEAVE_QWEN_05B_HF))
    count = estimate_memory(qwen, lora=R64, batch_size=1, seq_len=800).params_total
    assert abs(count / LLAVA_INTERLEAVE_QWEN_05B_PARAMS_APPROX - 1) < 0.05  # "0.9B" on the model page


def test_lora_trainable_count_is_exact(llava15):
    estimate = estimate_memory(llava15, lora=R64, batch_size=1, seq_len=TOKENS)
    per_layer = 64 * (4 * (4096 + 4096) + 2 * (4096 + 11008) + (11008 + 4096))
    assert estimate.params_trainable == 32 * per_layer == 159_907_840
    only_two = estimate_memory(llava15, lora=LoraSettings(rank=8, target_modules=("q_proj", "v_proj"),
                                                          layers_to_transform=[0, 1]), batch_size=1, seq_len=TOKENS)
    assert only_two.params_trainable == 2 * 2 * 8 * (4096 + 4096)


# Peak GiB measured for one MedAlign step (bf16, LoRA on every LLM linear, dropout 0.05, 674 tokens,
# tap at layer 20, AdamW): method.md's anchors (plain LoRA, LLaVA-1.5-7B shape) and this issue's
# run of benchmarks/memory_probe.py on an H200 (docs/memory_probe_h200.json).
MEASURED = [
    # (student, lora rank, batch, checkpointing, attention, peak GiB, source)
    ("llava15", 64, 1, False, "sdpa", 21.6, "method.md H100"),
    ("llava15", 64, 8, False, "sdpa", 67.4, "method.md H100"),
    ("llava15", 64, 4, False, "sdpa", 41.2, "method.md H200"),
    ("llava15", 64, 16, True, "sdpa", 23.6, "method.md H100"),
    ("llava15", 64, 4, False, "eager", 51.7, "method.md H200, all attentions returned"),
    ("llava15", 64, 8, True, "sdpa", 18.99, "memory_probe H200"),
    ("llava_med", 32, 1, False, "sdpa", 22.16, "memory_probe H200"),
    ("llava_med", 32, 8, False, "sdpa", 71.28, "memory_probe H200"),
    ("llava_med", 32, 16, True, "sdpa", 23.26, "memory_probe H200"),
]


@pytest.mark.parametrize("student, rank, batch, ckpt, attention, measured, source", MEASURED)
def test_estimate_is_within_five_percent_of_measured_peaks(llava15, llava_med, student, rank, batch, ckpt,
                                                           attention, measured, source):
    config = {"llava15": llava15, "llava_med": llava_med}[student]
    estimate = estimate_memory(config, lora=LoraSettings(rank=rank, alpha=16, dropout=0.05), batch_size=batch,
                               seq_len=TOKENS, gradient_checkpointing=ckpt, attn_implementation=attention)
    assert abs(estimate.gib() / measured - 1) < 0.05, (source, estimate.describe())


def test_estimate_grows_as_it_should(llava15):
    def gib(**kw):
        return estimate_memory(llava15, lora=R64, **{"batch_size": 4, "seq_len": TOKENS, **kw}).gib()

    assert gib(batch_size=8) - gib(batch_size=4) == pytest.approx(2 * (gib(batch_size=4) - gib(batch_size=2)))
    assert gib(gradient_checkpointing=True) < 0.5 * gib()
    assert gib(weight_dtype="float32") > gib() + 13  # fp32 weights + bf16 autocast copies
    assert gib(seq_len=2 * TOKENS) > 1.8 * (gib() - 15.5) + 15.5  # activations ~ linear in T with sdpa


def typed(config: dict):
    """The run settings of a config dict (what the platform's checks take)."""
    from medalign_platform.run.settings import RunSettings

    return RunSettings.from_config(config)


def _run_config(tmp_path, model_path, teacher_name, **overrides):
    """A composed-style run config pointing at real files (data JSONs are empty lists)."""
    for split in ("train", "val", "test"):
        (tmp_path / f"{split}.json").write_text("[]")
    config = {
        "model": {"path": model_path, "attn_implementation": "sdpa", "dtype": "bfloat16", "prompt_template": "auto",
                  "grid": None, "vision_feature_layer": None},
        "teacher": {"name": teacher_name, "pretrained": None, "cache_dir": str(tmp_path / "cache"), "attention": "cls"},
        "data": {"train": str(tmp_path / "train.json"), "val": str(tmp_path / "val.json"),
                 "test": str(tmp_path / "test.json"), "max_length": TOKENS},
        "distill": {"layer": 20, "lambda_align": 1.0, "lambda_attn": 0.06},
        "lora": {"rank": 64, "alpha": 16, "dropout": 0.05},
        "optim": {}, "trainer": {"batch_size": 8, "precision": "bf16"},
        "ray": {"use_gpu": True, "resources_per_worker": {"CPU": 1, "GPU": 1}},
    }
    for key, value in overrides.items():
        section, name = key.split("__")
        config[section][name] = value
    return config


def test_trial_fit_check_names_the_fixes(tmp_path):
    model = _config_only(tmp_path, "llava-1.5-7b-hf", LLAVA_15_7B_HF)
    teacher = tiny_pubmedclip(tmp_path / "pubmedclip")
    config = _run_config(tmp_path, model, "hf-clip:" + str(teacher))
    assert check_trial_fits(typed(config), {"GPU": 1}, parse_gpus([80])) == []  # ~67.5 GiB on an 80 GiB card
    problems = check_trial_fits(typed(config), {"GPU": 0.5}, parse_gpus(["H100-80GB"]))
    assert len(problems) == 1
    assert "sweep.trial_resources.GPU=1" in problems[0]
    assert "trainer.batch_size=2" in problems[0] and "grad_accum x4" in problems[0]  # batch 4 needs ~41.5 > 39
    assert "trainer.gradient_checkpointing=true" in problems[0]
    assert check_trial_fits(typed(config), {"GPU": 0.5}, parse_gpus(["H200-141GB"])) == []  # two per H200
    assert check_trial_fits(typed(config), {"CPU": 2}, parse_gpus([80])) == []  # a CPU trial has nothing to fit
    with pytest.raises(ConfigError, match="GiB"):
        parse_gpus(["B300"])


def test_preflight_report_for_llava_med_with_a_biomedclip_teacher(tmp_path):
    model = _config_only(tmp_path, "llava-med-hf", llava_med_converted_config())
    teacher = tiny_biomedclip(tmp_path / "biomedclip")
    config = _run_config(tmp_path, model, "local-dir:" + str(teacher), model__grid=[24, 24],
                         model__vision_feature_layer=-2)
    report = run_preflight(typed(config), gpus=parse_gpus([80, "H200-141GB"]))
    text = report.text()
    assert report.ok, text
    assert "24x24 = 576 image tokens" in text
    assert "grid 14x14 -> student 24x24 (bilinear upsampling x1.71)" in text
    assert "trials per GPU: 80 GiB GPU: 1, H200-141GB: 1" in text
    assert 70 < report.estimates["plain"].gib() < 75 and report.estimates["checkpointing"].gib() < 22


def test_preflight_problems_name_key_and_fix(tmp_path):
    model = _config_only(tmp_path, "llava-med-hf", llava_med_converted_config())
    vision_only = tmp_path / "unimed"
    from medalign_platform.convert.unimed_clip import convert_unimed_clip

    convert_unimed_clip(tiny_unimed_pt(tmp_path / "u.pt"), vision_only)
    config = _run_config(tmp_path, model, "local-dir:" + str(vision_only), model__grid=[16, 16],
                         data__max_length=512, model__attn_implementation="flash_attention_2",
                         teacher__attention="prompt_aware")
    report = run_preflight(typed(config), gpus=parse_gpus([80]))
    problems = "\n".join(report.problems)
    assert "model.grid=[16, 16]" in problems
    assert "data.max_length=512 cannot hold the 576 image tokens" in problems
    assert "teacher.attention=prompt_aware" in problems and "no text tower" in problems
    assert "flash_attn" in problems or "flash_attention_2" in problems
    assert not report.ok

    original = _config_only(tmp_path, "llava-med-original", LLAVA_MED_15_MISTRAL_7B)
    report = run_preflight(typed(_run_config(tmp_path, original, "local-dir:" + str(vision_only))), gpus=[])
    assert "medalign convert llava-med" in report.problems[0]

    layer = copy.deepcopy(config)
    layer["distill"]["layer"] = 32
    assert "1..31" in run_preflight(typed(layer), gpus=[]).problems[0]


def test_teacher_layouts_read_without_weights(tmp_path):
    biomed = teacher_layout({"name": "local-dir:" + str(tiny_biomedclip(tmp_path / "b"))})
    assert biomed["grid"] == (14, 14) and biomed["kind"] == "open_clip + timm ViT" and biomed["has_text"]
    pubmed = teacher_layout({"name": "hf-clip:" + str(tiny_pubmedclip(tmp_path / "p"))})
    assert pubmed["grid"] == (7, 7) and pubmed["width"] == 32
    named = teacher_layout({"name": "ViT-L-14-336-quickgelu"})  # UniMed-CLIP L/14's architecture
    assert named["grid"] == (24, 24) and named["width"] == 1024 and 3.0e8 < named["params"] < 3.1e8
    with pytest.raises(ConfigError, match="local HF cache"):
        teacher_layout({"name": "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224-not-cached"})


def test_sweep_refuses_a_trial_size_that_cannot_fit_before_ray(tmp_path):
    from types import SimpleNamespace

    from medalign_platform.tune.driver import _refuse_trials_that_cannot_fit

    model = _config_only(tmp_path, "llava-1.5-7b-hf", LLAVA_15_7B_HF)
    config = _run_config(tmp_path, model, "hf-clip:" + str(tiny_pubmedclip(tmp_path / "pubmedclip")))
    config["ray"]["gpu_memory_gib"] = ["A100-40GB"]  # the driver sees no GPU: the cluster's cards are declared
    with pytest.raises(ConfigError, match=r"a trial needs ~67\.5 GiB.*sweep.trial_resources|"
                                          r"a trial needs ~67\.5 GiB.*trainer.batch_size"):
        _refuse_trials_that_cannot_fit(typed(config), SimpleNamespace(trial_resources={"CPU": 1, "GPU": 1}))
    config["trainer"]["gradient_checkpointing"] = True
    _refuse_trials_that_cannot_fit(typed(config), SimpleNamespace(trial_resources={"CPU": 1, "GPU": 1}))  # ~19.5 GiB


@pytest.mark.parametrize("experiment, template, grid, teacher", [
    ("llava_med_unimed_7b", "mistral_instruct", [24, 24], "unimed-clip-vit-b16"),
    ("llava15_biomedclip_7b", "vicuna_v1", [24, 24], "hf-hub:microsoft/BiomedCLIP"),
    ("interleave_qwen_pubmedclip", "qwen_chatml", [27, 27], "hf-clip:flaviagiammarino/pubmed-clip"),
])
def test_real_model_presets_compose_with_their_formats(tmp_path, monkeypatch, experiment, template, grid, teacher):
    from medalign_platform.run.compose import compose_config

    root = tmp_path / "synthmed"
    root.mkdir()
    (root / "prepared.json").write_text(json.dumps({key: str(root / key) for key in ("data", "teacher", "student",
                                                                                        "cache")}))
    monkeypatch.setenv("MEDALIGN_CACHE", str(tmp_path))
    monkeypatch.setenv("MEDALIGN_MODELS", str(tmp_path / "models"))
    config = compose_config([f"experiment={experiment}"])
    assert config["model"]["prompt_template"] == template and config["model"]["grid"] == grid
    assert teacher in config["teacher"]["name"] and config["teacher"]["attention"] == "cls"
    assert config["distill"]["token_weights"] == "none" and config["trainer"]["gradient_checkpointing"] is False
    typed(config)  # every value types (prompt formats, grids, teacher.attention)
