"""benchmarks/loop_bench.py (loop vs bare step) and benchmarks/flops.py (model FLOPs, MFU)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    module = _load("loop_bench")
    yield module
    for name in ("loop_bench", "step_bench", "flops"):
        sys.modules.pop(name, None)


def _positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


@pytest.fixture
def one_thread():
    """One intra-op thread, as the benchmark is meant to run on this machine (docs/performance.md):
    with 2 threads on 2 shared cores the tiny step is several times slower, not faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Slow (about a minute on the shared 2-core machine, 2 rounds of 3 training steps each way plus an
# evaluation): the only test that runs the bench's own measurement and report end to end in-process
# (tests/benchmarks/test_gpu_check.py runs it as a subprocess, without asserting its figures).
@pytest.mark.slow
def test_tiny_run_reports_step_loop_ratio_and_evaluation_share(bench, tmp_path, capsys, one_thread):
    out = tmp_path / "loop.json"
    argv = ["--size", "tiny", "--batch", "2", "--seq-text", "24", "--steps", "2", "--warmup", "1", "--items", "12",
            "--eval-items", "2", "--max-new-tokens", "2", "--lora-rank", "8", "--device", "cpu", "--rounds", "2"]
    results = bench.main([*argv, "--json", str(out)])
    printed = capsys.readouterr().out
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))

    meta, step, loop = results["meta"], results["step"], results["loop"]
    assert meta["size"] == "tiny" and meta["device"] == "cpu" and meta["seq_len"] == 16 * 16 + 24
    assert meta["batch"] == 2 and meta["data_workers_requested"] == 1  # the cpu preset's
    assert meta["data_workers"] in (0, 1)  # capped by this machine's CPUs
    for row in (step, loop):
        assert _positive(row["ms_per_step"]) and _positive(row["samples_per_s"])
        assert row["samples_per_s"] == pytest.approx(2 / (row["ms_per_step"] / 1e3), rel=1e-9)
        assert row["tokens_per_s"] == pytest.approx(row["samples_per_s"] * meta["seq_len"], rel=1e-9)
        assert row["mfu"] is None and row["peak_gib"] is None  # no peak FLOP/s or allocator peak on a CPU
    ratio = results["ratio_loop_over_step"]
    # Neither the 0.95 target nor a ceiling of 1 is asserted: one timed step per phase on a shared
    # machine swings either way (1.41 was seen under load). A loop that skipped its work would be
    # far above 3; the exact bookkeeping is checked below.
    assert 0 < ratio < 3
    assert ratio == pytest.approx(loop["samples_per_s"] / step["samples_per_s"], rel=1e-9)
    assert 0 <= loop["data_wait_share"] < 1
    assert f"loop samples/s / step samples/s: {ratio:.3f}" in printed
    rounds = results["rounds"]
    assert len(rounds) == 2 and ratio in [r["ratio"] for r in rounds]  # the upper median of the rounds
    assert all(r["ratio"] == pytest.approx(r["step_ms"] / r["loop_ms"], rel=1e-9) for r in rounds)

    evaluation = results["evaluation"]
    assert evaluation["preset"] == "cpu" and (evaluation["eval_every"], evaluation["val_size"]) == (100, 200)
    assert [e["split"] for e in evaluation["measured"]] == ["val", "test"]
    assert all(e["items"] == 2 and e["seconds"] > 0 for e in evaluation["measured"])
    share = evaluation["share_of_run"]
    expected = evaluation["eval_s_per_evaluation"] / (evaluation["eval_s_per_evaluation"]
                                                       + 100 * loop["ms_per_step"] / 1e3)
    assert 0 < share < 1 and share == pytest.approx(expected, rel=1e-9)
    assert f"evaluation is {share:.1%} of a run" in printed


def test_the_bench_processor_matches_the_random_students_ids(bench):
    shape = bench.step_bench.SHAPES["tiny"]
    processor = bench.build_processor(shape)
    import numpy as np
    from PIL import Image

    image = Image.fromarray(np.zeros((80, 80, 3), dtype=np.uint8))
    encoded = processor(images=[image], text=["USER: <image>\nw20 w21 ASSISTANT:"])
    ids = list(encoded["input_ids"][0])
    assert ids.count(shape.image_token_id) == 16 * 16 and ids[0] == 1  # <s>
    assert processor.tokenizer.pad_token_id == shape.image_token_id + 1 and processor.tokenizer.eos_token_id == 2
    assert ids[1:3] == [3, 5] and ids[-2:] == [4, 5]  # user : ... assistant :
    assert list(encoded["pixel_values"][0].shape) == [3, shape.image_size, shape.image_size]


def test_model_flops_of_the_7b_shape_follow_the_stated_formula():
    flops = _load("flops")
    step_bench = _load("step_bench")
    try:
        from medalign_platform.core.student import LoraSettings, apply_lora

        model = step_bench.build_model(step_bench.SHAPES["7b"], torch.device("meta"), torch.bfloat16)
        model = apply_lora(model, LoraSettings(rank=64, alpha=16, dropout=0.05))
        result = flops.sample_flops(model, 674)
    finally:
        for name in ("flops", "step_bench"):
            sys.modules.pop(name, None)
    params = result["params"]
    # Llama-2-7B blocks (4 x 4096^2 + 3 x 4096 x 11008 each) x 32 + lm_head 32064 x 4096.
    assert params["llm"] == 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008) + 32064 * 4096
    assert params["lora"] == 32 * 64 * (4 * 2 * 4096 + 3 * (4096 + 11008))
    assert 3.0e8 < params["vision"] < 3.1e8  # CLIP ViT-L/14-336 without its embeddings
    assert result["llm"] == 674 * 4 * params["llm"] and result["lora"] == 674 * 6 * params["lora"]
    assert result["attention"] == 674 * 12 * 32 * 4096 * 674
    assert result["total"] == result["llm"] + result["lora"] + result["attention"] + result["vision"]
    assert 19.0e12 < result["total"] < 20.0e12  # ~19.6 TFLOP per 674-token sample
    # method.md's H100 compiled anchor, 12,969 tokens/s, would be 38% MFU against a 989.4 TFLOP/s peak.
    assert flops.mfu(result["total"], 12969 / 674, 989.4) == pytest.approx(0.381, abs=0.002)
    assert flops.mfu(result["total"], None, 989.4) is None and flops.mfu(result["total"], 1.0, None) is None
