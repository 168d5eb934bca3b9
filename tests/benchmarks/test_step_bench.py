"""benchmarks/step_bench.py: the plain-LoRA vs MedAlign step benchmark, run at tiny size."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "step_bench.py"
VARIANTS = ("plain", "medalign", "original")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("step_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _finite_positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_tiny_run_reports_three_variants_and_consistent_ratios(bench, tmp_path, capsys):
    out = tmp_path / "bench.json"
    # Smaller batch and text than the defaults keep this test at a few seconds on 2 CPU cores.
    argv = ["--size", "tiny", "--batch", "2", "--seq-text", "24", "--steps", "2", "--warmup", "1", "--device", "cpu"]
    results = bench.main([*argv, "--json", str(out)])
    printed = capsys.readouterr().out

    # The JSON file holds exactly what main returned.
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    meta = results["meta"]
    assert meta["device"] == "cpu" and meta["size"] == "tiny"
    assert meta["visual_grid"] == [16, 16] and meta["seq_len"] == 16 * 16 + 24
    assert meta["layer"] == 3 and meta["lora_rank"] == 64

    variants = results["variants"]
    assert set(variants) == set(VARIANTS)
    for name in VARIANTS:
        row = variants[name]
        assert row["error"] is None, name
        assert len(row["step_ms"]) == 2, name
        assert _finite_positive(row["ms_per_step"]), name
        assert _finite_positive(row["tokens_per_s"]), name
        assert row["peak_gib"] is None  # no honest peak on CPU
        expected = row["batch"] * row["seq_len"] / (row["ms_per_step"] / 1e3)
        assert row["tokens_per_s"] == pytest.approx(expected, rel=1e-9), name
        assert row["label"] in printed
    assert variants["plain"]["batch"] == variants["medalign"]["batch"] == 2
    assert variants["original"]["batch"] == 1

    ratios = results["ratios"]
    assert ratios["time_medalign_over_plain"] == pytest.approx(
        variants["medalign"]["ms_per_step"] / variants["plain"]["ms_per_step"], rel=1e-9
    )
    assert ratios["throughput_medalign_over_original"] == pytest.approx(
        variants["medalign"]["tokens_per_s"] / variants["original"]["tokens_per_s"], rel=1e-9
    )
    assert ratios["memory_medalign_over_plain"] is None
    assert f"{ratios['time_medalign_over_plain']:.3f}x" in printed
    assert f"{ratios['throughput_medalign_over_original']:.3f}x" in printed

    # Targets are only judged for the 7B shape on a GPU.
    assert results["targets_judged"] is False and results["targets_met"] is None
    assert "targets apply to --size 7b on a GPU" in printed
    assert "torch " in printed and "transformers " in printed

    # The MedAlign step really trained on all three terms.
    for name in ("medalign", "original"):
        terms = variants[name]["terms"]
        for key in ("loss", "lm", "spatial", "attention"):
            assert math.isfinite(terms[key]) and terms[key] != 0.0, (name, key)
        assert terms["loss"] > terms["lm"]


def test_original_approach_computes_the_same_terms_as_the_objective(bench):
    """hidden_states[L]/attentions[L] under eager == the SDPA tap at layer L (fp32, no dropout)."""
    from medalign_platform.core.objective import DistillSettings, MedAlignObjective
    from medalign_platform.core.student import LoraSettings, apply_lora, base_model

    shape = bench.SHAPES["tiny"]
    model = bench.build_model(shape, torch.device("cpu"), torch.float32)
    model = apply_lora(model, LoraSettings(rank=4, alpha=8, dropout=0.0))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.05)
    model.eval()
    batch = bench.make_batch(model, 2, 12, "cpu", torch.float32)
    teacher = bench.random_teacher(2, shape, "cpu")
    settings = DistillSettings(layer=3, lambda_align=1.0, lambda_attn=0.06)

    objective = MedAlignObjective(model, settings)
    with torch.no_grad():
        tapped = objective(batch, teacher)
    objective.remove()
    base_model(model).set_attn_implementation("eager")
    with torch.no_grad():
        original = bench.original_terms(model, batch, teacher, settings)
    base_model(model).set_attn_implementation("sdpa")
    for key in ("lm", "spatial", "attention", "loss"):
        assert float(original[key]) == pytest.approx(float(tapped[key]), rel=1e-4, abs=1e-6), key


def test_batch_layout(bench):
    model = bench.build_model(bench.SHAPES["tiny"], torch.device("cpu"), torch.float32)
    batch = bench.make_batch(model, 3, 20, "cpu", torch.float32)
    image_id = bench.SHAPES["tiny"].image_token_id
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids.shape == (3, 256 + 20) and batch["pixel_values"].shape == (3, 3, 64, 64)
    assert bool((batch["attention_mask"] == 1).all())
    for row, row_labels in zip(ids, labels):
        where = (row == image_id).nonzero().flatten()
        assert len(where) == 256 and int(where[0]) == bench.PROMPT_TOKENS and int(where[-1] - where[0]) == 255
        answer = (row_labels != -100).nonzero().flatten()
        prompt, question, answer_len = bench.text_layout(20)
        assert len(answer) == answer_len and int(answer[-1]) == len(row) - 1
        assert torch.equal(row_labels[answer], row[answer])
    with pytest.raises(ValueError, match="--seq-text"):
        bench.text_layout(6)


def test_7b_shape_is_llava_1_5_7b(bench):
    """The --size 7b model, built on the meta device: LLaVA-1.5-7B numbers and 674 tokens."""
    from medalign_platform.core.student import LoraSettings, apply_lora, decoder_layers, visual_grid

    shape = bench.SHAPES["7b"]
    model = bench.build_model(shape, torch.device("meta"), torch.bfloat16)
    config = model.config
    assert config.text_config.hidden_size == 4096 and config.text_config.num_hidden_layers == 32
    assert config.text_config.num_key_value_heads == 32 and config.text_config.intermediate_size == 11008
    assert config.text_config.vocab_size == 32064 and config.image_token_id == 32000
    assert config.vision_config.image_size == 336 and config.vision_config.patch_size == 14
    assert config.text_config._attn_implementation == "sdpa"
    assert next(model.parameters()).dtype == torch.bfloat16
    assert 7.0e9 < sum(p.numel() for p in model.parameters()) < 7.1e9
    model = apply_lora(model, LoraSettings(rank=64, alpha=16, dropout=0.05))
    assert visual_grid(model) == (24, 24) and len(decoder_layers(model)) == 32
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert lora == 32 * 64 * (4 * 2 * 4096 + 3 * (4096 + 11008))  # q,k,v,o + gate,up,down
    args = bench.parse_args(["--size", "7b"])
    assert (args.batch, args.seq_text, args.layer, args.lora_rank) == (8, 98, None, 64)
    batch = bench.make_batch(model, 2, args.seq_text, torch.device("meta"), torch.bfloat16)
    assert batch["input_ids"].shape == (2, 674)
