"""teacher.attention: prompt_aware -- question-conditioned targets cached per (image, question);
distill.token_weights: teacher_attention; distill.teacher_max_normalize is display-only."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from conftest import make_batch, random_teacher_targets
from PIL import Image

from medalign_platform.core.losses import spatial_alignment_loss, teacher_attention_map, teacher_similarity
from medalign_platform.core.objective import DistillSettings, MedAlignObjective, attention_token_weights
from medalign_platform.core.student import LoraSettings, apply_lora, load_student
from medalign_platform.core.target_cache import TargetCache
from medalign_platform.core.teacher import TeacherOutputs, load_teacher
from medalign_platform.synthmed.tiny_teacher import tiny_teacher

QUESTIONS = ["is there a lesion ?", "which side is the mass on ?", "how many nodules ?"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return load_teacher("local-dir:" + str(tiny_teacher(tmp_path_factory.mktemp("teacher"))))


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(5)
    return [Image.fromarray(rng.integers(0, 256, (48, 60, 3), dtype=np.uint8)) for _ in range(3)]


class OracleTeacher:
    """A teacher that is not an ExpertTeacher: the per-question cache API is duck-typed.

    Its "prompt-aware" map puts all mass on patch ``len(question) % h*w`` -- a stand-in for a
    SynthMed oracle whose attention follows the question.
    """

    def __init__(self, grid=(4, 4), width=8):
        self.identity = "oracle-identity-" + "0" * 48
        self.prompt_identity = "oracle-prompt-" + "1" * 50
        self.grid, self.width = grid, width
        self.prompt_calls = 0

    def encode_images(self, images, batch_size=None):
        n = self.grid[0] * self.grid[1]
        return TeacherOutputs(torch.ones(len(images), n, self.width), torch.full((len(images), n), 1.0 / n), self.grid)

    def encode_prompt_aware(self, images, questions, batch_size=None):
        self.prompt_calls += len(images)
        n = self.grid[0] * self.grid[1]
        maps = torch.zeros(len(images), n)
        maps[torch.arange(len(images)), torch.tensor([len(q) % n for q in questions])] = 1.0
        return maps


def test_per_question_targets_are_cached_and_exact(tmp_path, teacher, images):
    cache = TargetCache(tmp_path)
    pairs_images = [images[0], images[0], images[1], images[2]]
    pairs_questions = [QUESTIONS[0], QUESTIONS[1], QUESTIONS[0], QUESTIONS[2]]
    first = cache.get_or_compute(teacher, pairs_images, questions=pairs_questions)
    direct = teacher.encode_prompt_aware(pairs_images, pairs_questions)
    assert torch.equal(first.prompt_attention, direct)
    assert torch.equal(first.attention, first.prompt_attention)  # the attention target
    # Same image, another question: another map; the image entry itself is shared.
    assert not torch.allclose(first.prompt_attention[0], first.prompt_attention[1])
    assert torch.equal(first.patch_tokens[0], first.patch_tokens[1])
    assert (cache.stats.misses, cache.stats.hits) == (3 + 4, 0)  # 3 distinct images, 4 distinct pairs

    class Refusing:
        identity, prompt_identity, grid, width = teacher.identity, teacher.prompt_identity, teacher.grid, teacher.width

        def encode_images(self, *a, **k):
            raise AssertionError("image entry recomputed")

        def encode_prompt_aware(self, *a, **k):
            raise AssertionError("question entry recomputed")

    again = TargetCache(tmp_path).get_or_compute(Refusing(), pairs_images[::-1], questions=pairs_questions[::-1])
    assert torch.equal(again.prompt_attention, first.prompt_attention.flip(0))
    # Without questions the same cache serves plain CLS targets.
    plain = TargetCache(tmp_path).get_or_compute(Refusing(), [images[1]])
    assert plain.prompt_attention is None and torch.equal(plain.attention, first.cls_attention[2:3])


def test_any_teacher_with_the_prompt_api_can_use_the_cache(tmp_path, images):
    oracle = OracleTeacher()
    cache = TargetCache(tmp_path)
    out = cache.get_or_compute(oracle, images[:2] * 2, questions=["ab", "abc", "ab", "abcd"])
    assert out.prompt_attention.argmax(-1).tolist() == [2, 3, 2, 4]
    assert oracle.prompt_calls == 3  # (image 0, "ab") appears twice: computed once
    out = TargetCache(tmp_path).get_or_compute(oracle, images[:2], questions=["ab", "abcd"])
    assert oracle.prompt_calls == 3 and out.prompt_attention.argmax(-1).tolist() == [2, 4]


def test_corrupt_question_entry_is_recomputed(tmp_path, images):
    oracle = OracleTeacher()
    cache = TargetCache(tmp_path)
    cache.get_or_compute(oracle, images[:1], questions=["abc"])
    shard = next(tmp_path.glob("*/shard-*.safetensors"))
    raw = bytearray(shard.read_bytes())
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + header_len])
    name = next(k for k in header if k.endswith("/prompt_attention"))
    start = 8 + header_len + header[name]["data_offsets"][0]
    raw[start:start + 4] = b"\x00\x00\x80\x7f"  # the map's first float becomes +inf
    shard.write_bytes(bytes(raw))
    with pytest.warns(RuntimeWarning, match="corrupt entry"):
        out = TargetCache(tmp_path).get_or_compute(oracle, images[:1], questions=["abc"])
    assert torch.isfinite(out.prompt_attention).all() and oracle.prompt_calls == 2


def test_questions_need_a_prompt_aware_teacher(tmp_path, images):
    class Plain:
        identity, grid, width = "p" * 64, (4, 4), 8

        def encode_images(self, images, batch_size=None):
            return OracleTeacher().encode_images(images)

    with pytest.raises(TypeError, match="prompt_identity"):
        TargetCache(tmp_path).get_or_compute(Plain(), images[:1], questions=["q"])
    with pytest.raises(ValueError, match="questions has 1 items for 2 images"):
        TargetCache(tmp_path).get_or_compute(OracleTeacher(), images[:2], questions=["q"])


def test_prompt_identity_tracks_the_tokenizer_and_differs_from_identity(teacher):
    assert teacher.prompt_identity != teacher.identity and len(teacher.prompt_identity) == 64
    saved = teacher.tokenizer
    try:
        teacher.tokenizer = None
        assert teacher.prompt_identity != load_teacher(teacher.source.split("|")[0]).prompt_identity
    finally:
        teacher.tokenizer = saved


# ------------------------------------------------------------------ objective


@dataclass
class Targets:
    patch_tokens: torch.Tensor
    cls_attention: torch.Tensor
    grid: tuple
    prompt_attention: torch.Tensor | None = None


@pytest.fixture()
def peft_batch(tiny_student_dir, random_images):
    model, processor = load_student(tiny_student_dir)
    torch.manual_seed(0)
    model = apply_lora(model, LoraSettings(rank=4, alpha=8, dropout=0.0))
    return model, make_batch(processor, random_images, "right")


@pytest.mark.parametrize("normalize", ["probability", "l2"])
@pytest.mark.parametrize("token_weights", ["none", "teacher_attention"])
def test_teacher_max_normalize_cannot_change_either_loss(peft_batch, normalize, token_weights):
    model, batch = peft_batch
    teacher = random_teacher_targets(3)
    terms = {}
    for max_normalize in (True, False):
        settings = DistillSettings(layer=2, lambda_align=1.0, lambda_attn=0.5, attention_normalize=normalize,
                                   teacher_max_normalize=max_normalize, token_weights=token_weights)
        objective = MedAlignObjective(model, settings)
        with torch.no_grad():
            terms[max_normalize] = objective(batch, teacher)
        objective.remove()
    # The maps themselves do differ (so this test could fail) ...
    grid = teacher.grid
    assert not torch.allclose(teacher_attention_map(teacher.cls_attention, grid, (8, 8), max_normalize=True),
                              teacher_attention_map(teacher.cls_attention, grid, (8, 8), max_normalize=False))
    # ... but each loss removes the constant scale.
    for key in ("spatial", "attention", "loss"):
        assert torch.allclose(terms[True][key], terms[False][key], rtol=1e-5, atol=1e-7), key


def test_token_weights_from_teacher_attention_weight_the_spatial_loss(peft_batch):
    model, batch = peft_batch
    teacher = random_teacher_targets(3)
    settings = DistillSettings(layer=2, lambda_align=1.0, lambda_attn=0.0, token_weights="teacher_attention")
    objective = MedAlignObjective(model, settings)
    with torch.no_grad():
        weighted = objective(batch, teacher)["spatial"]
        plain = objective(batch, teacher, token_weights=torch.ones(3, 64))["spatial"]  # explicit weights win
        visual = _visual_states(objective, batch)
    similarity = teacher_similarity(teacher.patch_tokens, teacher.grid, (8, 8))
    weights = attention_token_weights(teacher_attention_map(teacher.cls_attention, teacher.grid, (8, 8)))
    assert torch.allclose(weights.mean(-1), torch.ones(3))
    assert torch.allclose(weighted, spatial_alignment_loss(visual, similarity, weights), atol=1e-6)
    assert torch.allclose(plain, spatial_alignment_loss(visual, similarity), atol=1e-6)
    assert not torch.allclose(weighted, plain)
    with pytest.raises(ValueError, match="token_weights"):
        DistillSettings(token_weights="cls")


def _visual_states(objective, batch):
    objective.model(**batch)
    return objective.tap.pop().visual_states


def test_prompt_attention_replaces_the_cls_map_as_the_attention_target(peft_batch):
    model, batch = peft_batch
    base = random_teacher_targets(3)
    prompt = torch.softmax(torch.randn(3, 16, generator=torch.Generator().manual_seed(9)), -1)
    objective = MedAlignObjective(model, DistillSettings(layer=2, lambda_align=0.0, lambda_attn=1.0))
    with torch.no_grad():
        with_prompt = objective(batch, Targets(base.patch_tokens, base.cls_attention, base.grid, prompt))["attention"]
        as_cls = objective(batch, Targets(base.patch_tokens, prompt, base.grid))["attention"]
        plain = objective(batch, base)["attention"]
    assert torch.allclose(with_prompt, as_cls) and not torch.allclose(with_prompt, plain)
