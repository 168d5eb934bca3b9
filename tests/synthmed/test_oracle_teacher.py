"""The SynthMed oracle teacher: exact targets from masks, per-question caching, config wiring."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medalign_platform.core.losses import teacher_attention_map, teacher_similarity
from medalign_platform.common.errors import ConfigError
from medalign_platform.data.splits import load_split
from medalign_platform.run.evaluation import TargetLookup, build_teacher, precompute_targets
from medalign_platform.run.settings import DataSettings, TeacherSettings
from medalign_platform.synthmed.generator import generate_synthmed
from medalign_platform.synthmed.oracle_teacher import (
    MAX_LESIONS,
    OracleTeacher,
    oracle_targets,
    relevant_region,
)

FACTORY = "medalign_platform.synthmed.oracle_teacher:build_oracle_teacher"


def _labels() -> np.ndarray:
    """16x16 labels on a 4x4 grid of 4x4-pixel cells: lesion 1 fills cells 0 and 1, lesion 2
    covers half of cell 15."""
    labels = np.zeros((16, 16), np.uint8)
    labels[0:4, 0:8] = 1
    labels[12:16, 14:16] = 2
    return labels


def test_attention_is_the_relevant_lesions_area_share_per_cell():
    labels = _labels()
    tokens, attention = oracle_targets(labels, labels == 2, (4, 4))
    assert attention.sum() == pytest.approx(1.0) and attention[15] == pytest.approx(1.0)
    _, attention = oracle_targets(labels, labels == 1, (4, 4))
    assert attention[[0, 1]].tolist() == [0.5, 0.5] and attention.sum() == pytest.approx(1.0)
    _, uniform = oracle_targets(labels, np.zeros_like(labels, bool), (4, 4))
    assert np.allclose(uniform, 1 / 16)
    assert tokens.shape == (16, 1 + MAX_LESIONS)
    assert tokens[0].tolist() == [0, 1, 0, 0] and tokens[5].tolist() == [1, 0, 0, 0]
    assert tokens[15].tolist() == [0.5, 0, 0.5, 0] and np.allclose(tokens.sum(1), 1)
    with pytest.raises(ValueError, match="does not split into a 3x3 grid"):
        oracle_targets(labels, None, (3, 3))


def test_similarity_target_is_a_lesion_background_block_structure():
    tokens, attention = oracle_targets(_labels(), _labels() == 1, (4, 4))
    similarity = teacher_similarity(torch.from_numpy(tokens)[None], (4, 4), (4, 4))[0]
    assert similarity[0, 1] == pytest.approx(1.0)          # same lesion
    assert similarity[2, 5] == pytest.approx(1.0)          # background with background
    assert similarity[0, 5] == pytest.approx(0.0, abs=1e-6)  # lesion vs background
    assert similarity[0, 15] == pytest.approx(0.0, abs=1e-6)  # lesion 1 vs a cell of lesion 2 and background
    assert 0.6 < similarity[15, 5] < 0.8                     # half background: in between (cos 45 deg)
    mapped = teacher_attention_map(torch.from_numpy(attention)[None], (4, 4), (4, 4))[0]
    assert mapped[[0, 1]].tolist() == [1.0, 1.0] and mapped.sum() == pytest.approx(2.0)


def test_relevant_region_is_the_lesion_in_the_named_quadrant_or_the_empty_quadrant():
    labels = _labels()     # lesion 1 in the left upper quadrant, lesion 2 in the right lower
    assert np.array_equal(relevant_region(labels, "in the left upper quadrant, is there a lesion?"), labels == 1)
    assert np.array_equal(relevant_region(labels, "in the right lower quadrant, what is the size of the lesion?"),
                          labels == 2)
    empty = relevant_region(labels, "in the right upper quadrant, is there a lesion?")   # answered "no" there
    half = labels.shape[0] // 2
    expected = np.zeros_like(empty)
    expected[:half, half:] = True
    assert np.array_equal(empty, expected)
    _, attention = oracle_targets(labels, empty, (4, 4))
    assert np.allclose(attention.reshape(4, 4), np.pad(np.full((2, 2), 0.25), ((0, 2), (2, 0))))
    assert np.array_equal(relevant_region(labels, "how many lesions are there?"), labels > 0)


def test_factory_builds_the_oracle_and_names_a_bad_factory():
    teacher = build_teacher(TeacherSettings(name="synthmed-oracle", factory=FACTORY, attention="prompt_aware"))
    assert isinstance(teacher, OracleTeacher) and teacher.grid == (8, 8) and teacher.width == 1 + MAX_LESIONS
    assert teacher.identity != OracleTeacher((4, 4)).identity and teacher.prompt_identity != teacher.identity
    with pytest.raises(ConfigError, match="teacher.factory"):
        build_teacher(TeacherSettings(name="x", factory="medalign_platform.nowhere:build"))
    with pytest.raises(TypeError, match="label masks next to image files"):
        teacher.encode_images([object()])
    # `medalign check` / the sweep's fit check read the layout from the built teacher.
    from medalign_platform.run.preflight import teacher_layout

    layout = teacher_layout({"name": "synthmed-oracle", "factory": FACTORY, "attention": "prompt_aware"})
    assert layout["grid"] == (8, 8) and layout["width"] == 1 + MAX_LESIONS and layout["params"] == 0


@pytest.fixture(scope="module")
def synthmed(tmp_path_factory):
    root = tmp_path_factory.mktemp("oracle") / "synthmed"
    generate_synthmed(root, seed=0, n_train=12, n_val=2, n_test=2, task_train_images=12, workers=1, progress=False)
    return root


def test_targets_are_per_question_and_cached(synthmed, tmp_path):
    teacher = TeacherSettings(name="synthmed-oracle", factory=FACTORY, attention="prompt_aware",
                              cache_dir=str(tmp_path / "cache"))
    data = DataSettings.from_dict({"train": str(synthmed / "train.json"), "image_root": str(synthmed),
                                   "validate_images": False})
    items = load_split(data, "train")
    # Two questions about different lesions of one image get different attention maps.
    by_image: dict[str, list[int]] = {}
    for i in range(len(items)):
        by_image.setdefault(items.image_path(i), []).append(i)
    pair = next(ix for ix in by_image.values() if len({items[i]["mask_path"] for i in ix}) > 1)
    first, second = items[pair[0]], next(items[i] for i in pair if items[i]["mask_path"] != items[pair[0]]["mask_path"])
    lookup = TargetLookup(teacher)
    targets = lookup([first["image_path"], second["image_path"]], [first["question"], second["question"]])
    assert targets.grid == (8, 8) and targets.patch_tokens.shape == (2, 64, 1 + MAX_LESIONS)
    assert torch.equal(targets.patch_tokens[0], targets.patch_tokens[1])     # same image, same structure
    assert not torch.allclose(targets.attention[0], targets.attention[1])
    for row, item in zip(targets.attention, (first, second)):
        # The record's mask is the lesion its question names: the oracle found the same one.
        mask = torch.from_numpy(np.asarray(item["mask"])).float()
        share = mask.reshape(8, 8, 8, 8).sum((1, 3)).flatten()
        torch.testing.assert_close(row, share / share.sum())
    # Per image (cls), the map covers every lesion of the image.
    every = TargetLookup(TeacherSettings(name="synthmed-oracle", factory=FACTORY, cache_dir=str(tmp_path / "cache")))
    assert every([first["image_path"]]).attention[0].gt(0).sum() > targets.attention[0].gt(0).sum()
    # The driver's precompute fills the cache per (image, question); a worker's lookup then only reads.
    stats = precompute_targets(teacher, items)
    assert stats["corrupt"] == 0
    again = TargetLookup(teacher)
    reread = again([first["image_path"], second["image_path"]], [first["question"], second["question"]])
    assert again.cache.stats.misses == 0 and again.cache.stats.hits >= 2
    assert torch.equal(reread.attention, targets.attention)
    assert torch.equal(reread.patch_tokens, targets.patch_tokens)


@pytest.mark.slow
def test_a_run_distils_from_the_oracle_and_reads_grounding_at_the_answer(tmp_path, monkeypatch):
    import math

    from medalign_platform.run.compose import compose_config
    from medalign_platform.run.loop import RunContext, run_training
    from medalign_platform.run.settings import RunSettings
    from medalign_platform.synthmed.prepare import prepare_mini_synthmed

    prepare_mini_synthmed(tmp_path / "cache")
    monkeypatch.setenv("MEDALIGN_CACHE", str(tmp_path / "cache"))
    config = compose_config(["experiment=synthmed_vqa", "teacher=synthmed_oracle", "trainer.max_steps=2",
                             "trainer.eval_every=0", "trainer.batch_size=4", "trainer.val_size=8",
                             "trainer.test_size=8", "trainer.max_new_tokens=4", "lora.rank=4"])
    settings = RunSettings.from_config(config)
    settings.check_paths()
    assert settings.teacher.attention == "prompt_aware" and settings.teacher.factory == FACTORY
    stats = precompute_targets(settings.teacher, load_split(settings.data, "train"))
    assert stats["misses"] > 0 and stats["corrupt"] == 0
    final = run_training(config, RunContext(report=lambda m, c: None, scratch_dir=tmp_path / "run"))
    assert final["train/attention"] > 0 and math.isfinite(final["train/spatial"])
    for key in ("test/grounding_layer", "test/grounding_answer", "test/pointing_answer"):
        assert key in final and final[key] >= 0, key
    assert final["test/grounding"] == final["test/grounding_layer"]
