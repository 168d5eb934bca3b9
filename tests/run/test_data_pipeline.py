"""The training input pipeline: replayable order, workers == in-process, no masks, CPU caps, the NaN watch."""

from __future__ import annotations

import pytest
import torch
from medalign_platform.run.data_pipeline import (
    MicroBatchSampler,
    TrainBatch,
    TrainCollate,
    TrainItems,
    available_cpus,
    resolve_data_workers,
    train_loader,
)
from medalign_platform.run.loop import NonFiniteLossError, NonFiniteWatch
from medalign_platform.run.optimization import epoch_batches

FAST = ["experiment=synthmed_vqa", "trainer.max_steps=6", "trainer.eval_every=3", "trainer.batch_size=4",
        "trainer.val_size=8", "trainer.test_size=8", "trainer.log_every=1", "trainer.max_new_tokens=4",
        "lora.rank=4", "distill.lambda_attn=0.5"]


# --------------------------------------------------------------------------- order (no data needed)


def test_sampler_replays_the_runs_micro_batches_from_any_position():
    whole = list(MicroBatchSampler(22, 4, seed=3, start=0, stop=14))
    assert len(whole) == 14
    # 22 items, batch 4: 5 micro-batches per epoch (the ragged tail is dropped), epochs reshuffle.
    per_epoch = epoch_batches(22, 4, 3, 0)
    assert whole[:5] == per_epoch and whole[5:10] == epoch_batches(22, 4, 3, 1) and whole[:5] != whole[5:10]
    for start in (1, 5, 7, 13):
        assert list(MicroBatchSampler(22, 4, seed=3, start=start, stop=14)) == whole[start:]
    assert len(MicroBatchSampler(22, 4, seed=3, start=14, stop=14)) == 0


def test_sampler_shards_each_epoch_across_ranks():
    ranks = [list(MicroBatchSampler(40, 4, seed=0, start=0, stop=5, rank=r, world_size=2)) for r in range(2)]
    seen = [i for shard in ranks for batch in shard for i in batch]
    assert sorted(seen) == list(range(40))  # 40 items = 5 micro-batches x 4 x 2 ranks, each once


def test_data_workers_are_capped_at_the_cpus_held_minus_one(caplog):
    assert resolve_data_workers(4, 16) == 4
    assert resolve_data_workers(4, 2) == 1
    assert resolve_data_workers(0, 8) == 0
    with caplog.at_level("WARNING"):
        assert resolve_data_workers(2, 1) == 0  # a 1-CPU Ray worker reads in-process
    assert "trainer.data_workers=2 capped to 0" in caplog.text and "ray.resources_per_worker.CPU" in caplog.text
    import os

    assert available_cpus() == len(os.sched_getaffinity(0))  # outside Ray: the affinity mask


def test_non_finite_watch_names_the_first_bad_step_and_its_terms():
    watch = NonFiniteWatch(["loss", "lm", "spatial"], torch.device("cpu"))
    watch.observe(0, torch.tensor(1.5), torch.tensor([1.5, 1.0, 0.5]))
    watch.check(1)  # all finite: nothing
    watch.observe(1, torch.tensor(float("nan")), torch.tensor([float("nan"), 1.0, float("nan")]))
    watch.observe(2, torch.tensor(float("inf")), torch.tensor([float("inf"), 2.0, 3.0]))
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 1 \(loss=nan, lm=1.0, spatial=nan; "
                                                 r"checked after step 3\)"):
        watch.check(3)


# --------------------------------------------------------------------------- real items (mini SynthMed)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Items, collate (processor, target lookup, span locator) of the mini SynthMed run."""
    from medalign_platform.core.objective import MedAlignObjective
    from medalign_platform.core.student import load_student
    from medalign_platform.data.collate import StudentCollator
    from medalign_platform.data.splits import load_split
    from medalign_platform.run.compose import compose_config
    from medalign_platform.run.evaluation import TargetLookup
    from medalign_platform.run.settings import RunSettings
    from medalign_platform.synthmed.prepare import prepare_mini_synthmed

    cache = tmp_path_factory.mktemp("medalign_cache")
    prepare_mini_synthmed(cache)
    patch = pytest.MonkeyPatch()
    patch.setenv("MEDALIGN_CACHE", str(cache))
    try:
        settings = RunSettings.from_config(compose_config(FAST))
    finally:
        patch.undo()
    model, processor = load_student(settings.model.path)
    objective = MedAlignObjective(model, settings.distill)
    targets = TargetLookup(settings.teacher)
    items = TrainItems(load_split(settings.data, "train"))
    collate = TrainCollate(StudentCollator(processor, max_length=settings.data.max_length), targets,
                           objective.tap.locator())
    yield items, collate, targets, objective
    objective.remove()


def _batches(items, collate, workers, start=0, stop=6):
    sampler = MicroBatchSampler(len(items), 4, seed=0, start=start, stop=stop)
    return list(train_loader(items, collate, sampler, workers=workers, prefetch=2, pin_memory=False, seed=0))


def _same(a: TrainBatch, b: TrainBatch) -> bool:
    return (a.inputs.keys() == b.inputs.keys() and all(torch.equal(a.inputs[k], b.inputs[k]) for k in a.inputs)
            and torch.equal(a.teacher.patch_tokens, b.teacher.patch_tokens)
            and torch.equal(a.teacher.cls_attention, b.teacher.cls_attention)
            and torch.equal(a.span.positions, b.span.positions)
            and torch.equal(a.span.query_positions, b.span.query_positions))


def test_questions_reach_the_target_lookup_and_prompt_maps_survive_the_copy(pipeline):
    """teacher.attention=prompt_aware: each item's question goes to the lookup with its image, and
    the question-conditioned map (the attention target then) travels with the batch to the device."""
    from medalign_platform.core.teacher import TeacherOutputs

    items, collate, targets, _ = pipeline
    asked = []

    def prompt_aware(paths, questions):  # the real cached targets, plus a distinct prompt map
        asked.append((list(paths), list(questions)))
        cached = targets(paths, questions)
        return TeacherOutputs(cached.patch_tokens, cached.cls_attention, cached.grid,
                              prompt_attention=cached.cls_attention.flip(-1))

    chosen = [items[i] for i in (0, 2, 5)]
    batch = TrainCollate(collate.collator, prompt_aware, collate.locator)(chosen)
    assert asked == [([item["image_path"] for item in chosen], [item["question"] for item in chosen])]
    moved = batch.to(torch.device("cpu"), torch.float32)
    assert moved.teacher.prompt_attention is not None
    assert torch.equal(moved.teacher.attention, batch.teacher.cls_attention.flip(-1))
    assert not torch.equal(moved.teacher.attention, moved.teacher.cls_attention)


def test_worker_processes_give_exactly_the_in_process_batches(pipeline):
    items, collate, targets, _ = pipeline
    rng = torch.get_rng_state()
    in_process = _batches(items, collate, workers=0)
    in_workers = _batches(items, collate, workers=2)
    # The loader seeds its workers from its own generator: LoRA dropout's RNG is untouched.
    assert torch.equal(torch.get_rng_state(), rng)
    assert len(in_process) == len(in_workers) == 6
    assert all(_same(a, b) for a, b in zip(in_process, in_workers))
    first = in_process[0]
    assert first.size == 4 and first.inputs["input_ids"].shape[0] == 4
    assert first.inputs["pixel_values"].dtype == torch.float32
    # The teacher targets are the cache's, looked up by image content (what the main process reads).
    paths = [items.records[i].image_path for i in next(iter(MicroBatchSampler(len(items), 4, 0, start=0, stop=1)))]
    direct = targets([str(p) for p in paths])
    assert torch.equal(first.teacher.patch_tokens, direct.patch_tokens)


def test_a_resumed_loader_starts_at_the_same_micro_batch(pipeline):
    items, collate, _, _ = pipeline
    whole = _batches(items, collate, workers=1, start=0, stop=6)
    resumed = _batches(items, collate, workers=1, start=4, stop=6)
    assert all(_same(a, b) for a, b in zip(whole[4:], resumed))


def test_training_items_never_read_lesion_masks(pipeline, monkeypatch):
    from medalign_platform.data import conversations

    items, collate, _, _ = pipeline
    assert any(record.mask_path is not None for record in items.records)  # the split has masks

    def no_masks(path):
        raise AssertionError(f"a training item read its mask {path}")

    monkeypatch.setattr(conversations, "read_mask", no_masks)
    item = items[next(i for i, r in enumerate(items.records) if r.mask_path is not None)]
    assert "mask" not in item and item["image"].mode == "RGB"
    assert _batches(items, collate, workers=0, stop=2)  # the whole in-process path reads none either


def test_a_batch_goes_to_the_device_with_pixels_in_the_students_dtype(pipeline):
    items, collate, _, _ = pipeline
    (batch,) = _batches(items, collate, workers=0, stop=1)
    moved = batch.to(torch.device("cpu"), torch.bfloat16)
    assert moved.inputs["pixel_values"].dtype == torch.bfloat16
    assert moved.inputs["input_ids"].dtype == torch.long and moved.teacher.patch_tokens.dtype == torch.float32
    assert torch.equal(moved.span.positions, batch.span.positions)


def test_a_lookup_built_from_its_key_reads_the_cache_without_loading_the_teacher(pipeline):
    from medalign_platform.run.evaluation import TargetLookup

    items, _, targets, _ = pipeline
    keyed = TargetLookup(targets.settings, key=targets.key)
    assert keyed._model is None and keyed.key == targets.key
    paths = [str(items.records[i].image_path) for i in range(3)]
    assert torch.equal(keyed(paths).patch_tokens, targets(paths).patch_tokens)
    assert keyed._model is None  # every image was in the cache: the teacher was never loaded


# --------------------------------------------------------------------------- the loop with loader workers


@pytest.mark.slow
def test_resumed_run_with_dropout_and_loader_workers_repeats_the_uninterrupted_run(tmp_path_factory, tmp_path):
    """LoRA dropout draws from the global RNG: resuming must restore it and not let the loader move it."""
    from medalign_platform.run.compose import compose_config
    from medalign_platform.run.loop import RunContext, run_training
    from medalign_platform.synthmed.prepare import prepare_mini_synthmed

    cache = tmp_path_factory.mktemp("resume_cache")
    prepare_mini_synthmed(cache)
    patch = pytest.MonkeyPatch()
    patch.setenv("MEDALIGN_CACHE", str(cache))
    try:
        config = compose_config([*FAST, "trainer.max_steps=4", "trainer.eval_every=2", "lora.dropout=0.2",
                                 "trainer.data_workers=1", "trainer.val_size=4", "trainer.test_size=4"])
    finally:
        patch.undo()

    def run(name, resume_from=None):
        reports = []
        context = RunContext(report=lambda m, c: reports.append((m, c)), resume_from=resume_from,
                             scratch_dir=tmp_path / name, cpus=2)
        run_training(config, context)
        return reports

    whole = run("whole")
    assert whole[0][0]["perf/data_workers"] == 1
    checkpoint = next(c for m, c in whole if m["step"] == 2)
    resumed = run("resumed", resume_from=checkpoint)
    assert [m["step"] for m, _ in resumed] == [3, 4]
    for (a, _), (b, _) in zip(whole[2:], resumed):
        for key in ("train/loss", "train/lm", "train/spatial", "train/attention", "train/grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), (a["step"], key)
