"""Tiny trained expert CLIP: loss, determinism, checkpoint round trip.

Its quality thresholds are checked on a real `medalign prepare` build: test_prepared_build.py."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from PIL import Image

from medalign_platform.synthmed.expert_clip import (
    EXPERT_CLIP_ARCH,
    clip_loss,
    fit_expert_clip,
    load_report_pairs,
    save_expert_clip,
)
from medalign_platform.synthmed.generator import ensure_synthmed
from medalign_platform.synthmed.tiny_teacher import tiny_teacher_config
from medalign_platform.core.teacher import ExpertTeacher, load_teacher

SHORT_STEPS = 20


@pytest.fixture(scope="module")
def synthmed_dir(tmp_path_factory):
    """A small SynthMed: the short runs see a few batches (the default build's retrieval and
    grounding are checked on a real `medalign prepare` build, test_prepared_build.py)."""
    root = tmp_path_factory.mktemp("expert_clip") / "synthmed"
    ensure_synthmed(root, n_train=400, n_val=40, n_test=100, progress=False)
    return root


@pytest.fixture(scope="module")
def short_run(synthmed_dir):
    return fit_expert_clip(synthmed_dir, steps=SHORT_STEPS, progress=False)


def _manual_loss(image_emb, text_emb, scale, text_index):
    """The loss written out row by row, for comparison."""
    logits = scale * image_emb @ text_emb.T
    i2t = torch.stack([-logits[b].log_softmax(0)[text_index[b]] for b in range(len(logits))])
    t2i = []
    for u in range(text_emb.shape[0]):
        owners = (text_index == u).nonzero().flatten()
        t2i.append(-logits[:, u].log_softmax(0)[owners].mean())
    return (i2t.mean() + torch.stack(t2i).mean()) / 2


def test_one_config_builder_gives_the_expert_and_the_tiny_teacher_configs():
    # The configs both always had (stored in open_clip_config.json and so in every build).
    assert tiny_teacher_config(**EXPERT_CLIP_ARCH) == {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32,
                       "pos_embed_type": "sin_cos_2d"},
        "text_cfg": {"context_length": EXPERT_CLIP_ARCH["context_length"], "vocab_size": 49408, "width": 64,
                     "heads": 4, "layers": 2},
    }
    assert tiny_teacher_config() == {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    assert "pos_embed_type" not in tiny_teacher_config(timm_model_name="vit_tiny_patch16_224",
                                                       pos_embed_type="sin_cos_2d")["vision_cfg"]


def test_clip_loss_equals_open_clip_for_distinct_reports():
    gen = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(6, 8, generator=gen), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(6, 8, generator=gen), dim=-1)
    scale = torch.tensor(7.5)
    expected = open_clip.ClipLoss()(image, text, scale)
    torch.testing.assert_close(clip_loss(image, text, scale, torch.arange(6)), expected)


def test_clip_loss_with_shared_reports_matches_manual():
    gen = torch.Generator().manual_seed(1)
    image = torch.nn.functional.normalize(torch.randn(5, 8, generator=gen), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(3, 8, generator=gen), dim=-1)
    text_index = torch.tensor([0, 1, 0, 2, 0])  # report 0 describes images 0, 2 and 4
    scale = torch.tensor(10.0)
    torch.testing.assert_close(clip_loss(image, text, scale, text_index),
                               _manual_loss(image, text, scale, text_index))


def test_report_pairs_one_per_image(synthmed_dir):
    pairs = load_report_pairs(synthmed_dir, "test")
    assert len(pairs) == 100
    assert len({p["image"] for p in pairs}) == 100
    assert pairs[0]["report"].endswith(".")
    assert all(p["mask"].is_file() for p in pairs[:5])


def test_training_is_deterministic(synthmed_dir, short_run):
    model_a, info_a = short_run
    rng_before = torch.random.get_rng_state()
    model_b, info_b = fit_expert_clip(synthmed_dir, steps=SHORT_STEPS, progress=False)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # caller's RNG untouched
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), name
    assert info_a["final_loss"] == info_b["final_loss"]
    # ... and training did move the weights away from the seeded init.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        init = open_clip.CLIP(**info_a["model_cfg"]).state_dict()
    assert not torch.equal(init["visual.conv1.weight"], state_a["visual.conv1.weight"])
    assert torch.equal(init["token_embedding.weight"], state_a["token_embedding.weight"])


def test_checkpoint_round_trip_through_load_teacher(synthmed_dir, short_run, tmp_path):
    model, info = short_run
    out = save_expert_clip(model, info["model_cfg"], tmp_path / "ckpt", info)
    assert {p.name for p in out.iterdir()} == {
        "open_clip_config.json", "open_clip_model.safetensors", "training.json"}
    assert json.loads((out / "training.json").read_text())["steps"] == SHORT_STEPS

    loaded = load_teacher("local-dir:" + str(out))
    in_memory = ExpertTeacher(model, loaded.preprocess, loaded.tokenizer)
    assert loaded.grid == (8, 8)
    assert loaded.identity == in_memory.identity

    pairs = load_report_pairs(synthmed_dir, "test")[:8]
    images = [Image.open(p["image"]).convert("RGB") for p in pairs]
    a, b = loaded.encode_images(images), in_memory.encode_images(images)
    assert torch.equal(a.cls_attention, b.cls_attention)
    assert torch.equal(a.patch_tokens, b.patch_tokens)
    reports = [p["report"] for p in pairs]
    assert torch.equal(loaded.encode_questions(reports), in_memory.encode_questions(reports))
    # The saved tokenizer keeps whole two-lesion reports (<= 34 tokens with SOT/EOT).
    assert loaded.tokenizer.context_length >= 34
