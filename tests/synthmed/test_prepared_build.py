"""The build `medalign prepare data=synthmed` makes, checked end to end on a fresh build.

One module fixture runs the real ``prepare_synthmed`` (data, expert CLIP and base LVLM
side by side, the linear probes, ``prepared.json``) into a temporary cache, exactly as the
command does; the tests then check the properties the benchmark relies on (issue #14): the
expert CLIP's retrieval and grounding, the student's eyes (probes), its answer format and
imperfect grounding, a reload with identical logits, and the positive control (the oracle
lifts task accuracy over LoRA only). They read the figures prepare itself recorded, so the
docs' per-build figures and these thresholds come from one computation.
"""

from __future__ import annotations

import json

import pytest
import torch

from medalign_platform.core.student import check_layer, decoder_layers, load_student, visual_grid
from medalign_platform.data.collate import StudentCollator, generate_answers
from medalign_platform.data.conversations import load_conversation_dataset
from medalign_platform.data.metrics import closed_accuracy, normalize_answer
from medalign_platform.synthmed.base_lvlm import DEFAULT_ARCHITECTURE
from medalign_platform.synthmed.generator import pretrain_file

CLOSED_EVAL = 400   # val closed corpus questions the tests score themselves


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Evaluate on one thread (two threads on shared cores can be 10x slower)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """``medalign prepare data=synthmed`` at its defaults into an empty cache (a few minutes)."""
    from medalign_platform.synthmed.prepare import SynthMedPrepareSettings, prepare_synthmed

    cache = tmp_path_factory.mktemp("prepared")
    build = prepare_synthmed(SynthMedPrepareSettings(cache_dir=str(cache), progress=False))
    return {"build": build, "cache": cache,
            "record": json.loads((cache / "synthmed" / "prepared.json").read_text())}


@pytest.fixture(scope="module")
def val_closed(prepared):
    data_dir = prepared["build"].data_dir
    val = load_conversation_dataset(data_dir / pretrain_file("val"), data_dir)
    closed = [i for i, item in enumerate(val.items) if item.answer_type == "closed"]
    assert len(closed) >= CLOSED_EVAL
    step = len(closed) / CLOSED_EVAL
    return [val[closed[int(k * step)]] for k in range(CLOSED_EVAL)]


@pytest.mark.slow
def test_the_record_names_every_stage_with_its_figures(prepared):
    record, build = prepared["record"], prepared["build"]
    assert (record["data"], record["teacher"], record["student"]) == tuple(
        str(p) for p in (build.data_dir, build.teacher_dir, build.student_dir))
    assert (build.teacher_dir / "open_clip_model.safetensors").is_file()
    assert (build.student_dir / "model.safetensors").is_file()
    student = record["student_metrics"]
    assert len(student["weights_sha256"]) == 64 and student["torch"] == torch.__version__
    assert set(record["seconds"]) == {"data", "teacher", "student"}
    # The benchmark task's closed answers are balanced on every split (issue #14, item 2).
    for split in ("train", "val", "test"):
        assert record["data_metrics"]["task"][split]["closed_yes_fraction"] == 0.5


@pytest.mark.slow
def test_the_expert_clip_meets_retrieval_and_grounding_thresholds(prepared):
    metrics = prepared["record"]["teacher_metrics"]   # evaluate_expert_clip on 200 test pairs
    assert metrics["n_pairs"] == 200 and metrics["n_lesion_images"] > 50
    # SynthMed v2+ reports name up to three lesions with three attributes each: seed 0's build
    # scores 0.435 (v1: 0.60-0.635 over seeds), docs/synthmed.md.
    assert metrics["r_at_1"] >= 0.4, metrics
    assert metrics["r_at_1_index"] <= metrics["r_at_1"]
    assert metrics["attention_lift"] >= 3.0, metrics


@pytest.mark.slow
def test_the_student_sees_what_the_task_asks(prepared):
    """Issue #14's eyes: linear probes on the visual tokens the LLM receives read each
    quadrant's lesion and the lesion count on held-out images (prepare fits them on 2000
    train images and scores them on the first 500 test images; docs/synthmed.md)."""
    probes = prepared["record"]["student_metrics"]["probes"]
    assert probes["method"] == "logistic" and probes["test_images"] == 500, probes
    assert probes["quadrant"] >= 0.95, probes
    assert probes["count"] >= 0.85, probes
    assert probes["contrast"] >= 0.9, probes


@pytest.mark.slow
def test_pretrained_model_reloads_with_identical_logits(prepared, val_closed):
    pretrained = prepared["build"].student_dir
    info = json.loads((pretrained / "training.json").read_text())
    assert info["name"] == "base_lvlm" and info["architecture"] == DEFAULT_ARCHITECTURE
    assert info["final_loss"] is not None and info["final_loss"] < 1.0
    model, processor = load_student(pretrained)
    again, _ = load_student(pretrained)
    assert visual_grid(model) == (8, 8)
    depth = len(decoder_layers(model))
    assert depth >= 4 and check_layer(depth - 1, depth) == depth - 1
    batch, _ = StudentCollator(processor)(val_closed[:8])
    with torch.no_grad():
        a = model.eval()(**batch).logits
        b = again.eval()(**batch).logits
    assert torch.equal(a, b)
    assert processor.tokenizer.unk_token_id not in batch["input_ids"].tolist()


@pytest.mark.slow
def test_answers_in_format_and_grounding_imperfect(prepared, val_closed):
    pretrained = prepared["build"].student_dir
    model, processor = load_student(pretrained)
    predictions = generate_answers(model, processor, val_closed, max_new_tokens=4, batch_size=64)
    references = [item["answer"] for item in val_closed]
    yes_no = sum(normalize_answer(p) in ("yes", "no") for p in predictions) / len(predictions)
    accuracy = closed_accuracy(predictions, references)
    prior = max(references.count("yes"), references.count("no")) / len(references)
    info = json.loads((pretrained / "training.json").read_text())
    message = (f"yes/no rate {yes_no:.3f}, closed accuracy {accuracy:.3f}, prior {prior:.3f}, "
               f"training.json {info['val']}")
    assert yes_no >= 0.95, message
    assert accuracy > 0.55, message
    assert accuracy > prior + 0.03, message   # it looks at the image, not only at the question
    # training.json's own evaluation (300 closed + open corpus questions) agrees on the picture.
    val = info["val"]
    assert val["n_closed"] + val["n_open"] == 300
    assert val["closed_accuracy"] > 0.55 and val["closed_yes_no_rate"] >= 0.95
    assert 0.0 < val["open_recall"] <= 1.0
    # The benchmark task (a place named, what is there asked) is never trained on here: room
    # for the fine-tune (v2 builds score about chance on it, docs/synthmed.md).
    assert info["task_val_zero_shot"]["closed_accuracy"] < 0.9


# The positive control's fine-tunes: the preset's 500 steps (the oracle's gain needs them,
# docs/synthmed.md), scored on the first 150 val images' task questions.
CONTROL_VAL_IMAGES = 150


@pytest.mark.slow
def test_the_oracle_lifts_task_accuracy_over_lora_only(prepared, tmp_path, monkeypatch):
    """Issue #14's positive control on a small fixed split: with the same seed, data and
    base model, distilling the oracle (``teacher=synthmed_oracle`` at the preset's weights)
    answers the benchmark task better than LoRA alone. If this fails, the benchmark cannot
    reward grounding. Measured on this build (weights ``2013a5e0...``): LoRA only 0.550,
    oracle 0.683 closed accuracy on these 300 questions, grounding_layer 1.19 vs 7.22 (the
    v3 table, on the test split over 5 seeds: +0.164, docs/synthmed.md)."""
    from medalign_platform.data.splits import load_split
    from medalign_platform.run.compose import compose_config
    from medalign_platform.run.evaluation import precompute_targets
    from medalign_platform.run.loop import RunContext, run_training
    from medalign_platform.run.settings import RunSettings

    monkeypatch.setenv("MEDALIGN_CACHE", str(prepared["cache"]))   # ${synthmed:...} reads its record
    val = json.loads((prepared["build"].data_dir / "val.json").read_text())
    images = set(sorted({item["image"] for item in val})[:CONTROL_VAL_IMAGES])
    fixed = [item for item in val if item["image"] in images]
    (tmp_path / "fixed.json").write_text(json.dumps(fixed))
    # Both runs name the oracle teacher (LoRA only has both loss weights 0, so its targets are
    # never used): the runs differ in the loss weights alone.
    common = ["experiment=synthmed_vqa", "teacher=synthmed_oracle", "trainer.seed=0", "trainer.eval_every=0",
              "trainer.num_threads=1", f"data.val={tmp_path / 'fixed.json'}", f"data.test={tmp_path / 'fixed.json'}",
              "trainer.val_size=1", "trainer.test_size=0"]
    closed = {}   # (scored once, as the test split, in full)
    for name, variant in (("lora", ["distill=lora_only"]), ("oracle", [])):
        config = compose_config([*common, *variant])
        settings = RunSettings.from_config(config)
        settings.check_paths()
        if name == "oracle":
            precompute_targets(settings.teacher, load_split(settings.data, "train"))
        final = run_training(config, RunContext(report=lambda m, c: None, scratch_dir=tmp_path / name))
        closed[name] = final["test/closed_accuracy"], final["test/grounding_layer"], final["test/n_closed"]
    (lora, lora_grounding, n), (oracle, oracle_grounding, _) = closed["lora"], closed["oracle"]
    message = f"{closed} (closed accuracy, grounding_layer, closed questions)"
    assert n >= 250, message
    assert oracle_grounding > 2 * lora_grounding, message   # the oracle moved attention onto the region ...
    assert oracle >= lora + 0.05, message                   # ... and that decides the answers
