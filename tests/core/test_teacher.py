"""Tests for the frozen expert teacher (medalign_platform.core.teacher) on tiny random CLIPs."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from medalign_platform.core.teacher import ExpertTeacher, TeacherOutputs, load_teacher
from medalign_platform.synthmed.tiny_teacher import tiny_teacher, tiny_teacher_checkpoint

TEXT_CFG = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_teacher(tmp_path_factory.mktemp("tiny_teacher"))


@pytest.fixture(scope="module")
def teacher(tiny_dir):
    return load_teacher("local-dir:" + str(tiny_dir))


@pytest.fixture(scope="module")
def timm_teacher(tmp_path_factory):
    directory = tiny_teacher(tmp_path_factory.mktemp("timm_teacher"), image_size=224,
                             timm_model_name="vit_tiny_patch16_224")
    return load_teacher("local-dir:" + str(directory))


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _last_block_input(visual, pixel_values):
    """Runs the native tower block by block, independently of the teacher's hooks."""
    x = visual._embeds(pixel_values)
    for block in visual.transformer.resblocks[:-1]:
        x = block(x)
    return x


def test_tiny_teacher_is_a_valid_deterministic_local_dir(tmp_path, tiny_dir):
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + str(tiny_dir))
    assert model.visual.grid_size == (8, 8)
    assert preprocess(Image.new("RGB", (90, 70))).shape == (3, 64, 64)
    again = load_file(str(tiny_teacher(tmp_path / "again") / "open_clip_model.safetensors"))
    first = load_file(str(tiny_dir / "open_clip_model.safetensors"))
    assert all(torch.equal(first[k], again[k]) for k in first)
    other = load_file(str(tiny_teacher(tmp_path / "seed1", seed=1) / "open_clip_model.safetensors"))
    assert not torch.equal(first["visual.proj"], other["visual.proj"])


def test_local_dir_and_name_plus_checkpoint_routes_agree(tmp_path, teacher, pixels):
    name, weights = tiny_teacher_checkpoint(tmp_path, name="medalign-test-teacher-route")
    via_file = load_teacher(name, str(weights))
    a, b = teacher.encode(pixels), via_file.encode(pixels)
    assert torch.equal(a.patch_tokens, b.patch_tokens)
    assert torch.equal(a.cls_attention, b.cls_attention)
    # Same weights, architecture and preprocessing: same targets, so same identity.
    assert via_file.identity == teacher.identity


def test_grid_width_and_shapes(teacher, pixels):
    out = teacher.encode(pixels)
    assert isinstance(out, TeacherOutputs)
    assert teacher.grid == (8, 8) and out.grid == (8, 8) and teacher.width == 64
    assert out.patch_tokens.shape == (3, 64, 64) and out.patch_tokens.dtype == torch.float32
    assert out.cls_attention.shape == (3, 64)
    half = out.to(dtype=torch.float16)
    assert half.patch_tokens.dtype == torch.float16 and half.grid == (8, 8)


def test_patch_tokens_are_last_block_output_before_ln_post(teacher, pixels):
    visual = teacher.model.visual
    out = teacher.encode(pixels)
    with torch.no_grad():
        manual = visual.transformer.resblocks[-1](_last_block_input(visual, pixels))
        hidden = visual.forward_intermediates(
            pixels, indices=[len(visual.transformer.resblocks) - 1], output_fmt="NLC",
            intermediates_only=True)["image_intermediates"][-1]
        normed = visual.ln_post(manual)[:, 1:]
    assert torch.allclose(out.patch_tokens, manual[:, 1:], atol=1e-6, rtol=0)
    assert torch.allclose(out.patch_tokens, hidden, atol=1e-6, rtol=0)
    assert (out.patch_tokens - normed).abs().max() > 1e-2


def test_cls_attention_equals_eager_multihead_attention(teacher, pixels):
    visual = teacher.model.visual
    last = visual.transformer.resblocks[-1]
    out = teacher.encode(pixels)
    with torch.no_grad():
        y = last.ln_1(_last_block_input(visual, pixels))
        _, weights = last.attn(y, y, y, need_weights=True, average_attn_weights=True)
    assert out.cls_attention.shape == (3, 64)
    assert (out.cls_attention >= 0).all()
    assert (out.cls_attention - weights[:, 0, 1:]).abs().max() <= 1e-6
    # The full CLS row (with its own CLS column) is a probability distribution.
    full_row = out.cls_attention.sum(-1) + weights[:, 0, 0]
    assert torch.allclose(full_row, torch.ones(3), atol=1e-5)
    assert (out.cls_attention.sum(-1) < 1).all()


def test_encode_images_applies_preprocess_and_batches(teacher):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))
              for _ in range(3)]
    whole = teacher.encode_images(images)
    batched = teacher.encode_images(images, batch_size=2)
    direct = teacher.encode(torch.stack([teacher.preprocess(im) for im in images]))
    assert torch.allclose(whole.patch_tokens, direct.patch_tokens, atol=1e-6)
    assert torch.allclose(batched.patch_tokens, whole.patch_tokens, atol=1e-5)
    assert torch.allclose(batched.cls_attention, whole.cls_attention, atol=1e-6)


def test_identity_is_stable_and_tracks_weights(tmp_path, tiny_dir, teacher):
    assert len(teacher.identity) == 64
    assert load_teacher("local-dir:" + str(tiny_dir)).identity == teacher.identity
    changed = shutil.copytree(tiny_dir, tmp_path / "changed")
    weights = load_file(str(changed / "open_clip_model.safetensors"))
    weights["visual.transformer.resblocks.0.ln_1.weight"][0] += 1e-3
    save_file(weights, str(changed / "open_clip_model.safetensors"))
    assert load_teacher("local-dir:" + str(changed)).identity != teacher.identity


def test_identity_follows_dtype_changes(tiny_dir):
    fresh = load_teacher("local-dir:" + str(tiny_dir))
    before = fresh.identity
    fresh.to(torch.float64)
    assert fresh.identity != before


def test_teacher_is_frozen(teacher, pixels):
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.model.training and not teacher.model.visual.training
    assert not teacher.encode(pixels).patch_tokens.requires_grad


def test_prompt_aware_attention_native(teacher, pixels):
    questions = ["is there a fracture in the left femur?", "what organ is shown?",
                 "is the lesion malignant?"]
    scores = teacher.prompt_aware_attention(pixels, questions)
    assert scores.shape == (3, 64) and (scores >= 0).all() and scores.max() > 0
    other = teacher.prompt_aware_attention(pixels, ["lung"] * 3)
    assert not torch.allclose(scores, other)
    with pytest.raises(ValueError, match="one question per image"):
        teacher.prompt_aware_attention(pixels, ["only one"])


def test_cls_contributions_sum_to_the_attention_output(teacher, pixels):
    """The per-token split used by prompt_aware_attention is exact before the norm."""
    visual = teacher.model.visual
    last = visual.transformer.resblocks[-1]
    with torch.no_grad():
        y = last.ln_1(_last_block_input(visual, pixels))
        attn_out, _ = last.attn(y, y, y, need_weights=False)
        probs = teacher._cls_attention_heads(y)
        contributions = teacher._cls_patch_contributions(y, probs)
    rebuilt = contributions.sum(1) + last.attn.out_proj.bias
    assert torch.allclose(rebuilt, attn_out[:, 0], atol=1e-5)


def test_timm_tower_matches_timm_attention(timm_teacher):
    trunk = timm_teacher.model.visual.trunk
    assert timm_teacher.grid == (14, 14) and timm_teacher.width == 192
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    out = timm_teacher.encode(pixels)
    assert out.patch_tokens.shape == (2, 196, 192) and out.cls_attention.shape == (2, 196)

    # Independent reference: timm's own unfused attention exposes its softmax output
    # as the input of attn_drop.
    attn = trunk.blocks[-1].attn
    captured = {}
    handle = attn.attn_drop.register_forward_hook(
        lambda _m, inputs, _out: captured.update(probs=inputs[0]))
    fused, attn.fused_attn = attn.fused_attn, False
    try:
        with torch.no_grad():
            hidden = trunk.forward_intermediates(
                pixels, indices=[len(trunk.blocks) - 1], output_fmt="NLC",
                intermediates_only=True, norm=False)[-1]
    finally:
        attn.fused_attn = fused
        handle.remove()
    reference = captured["probs"].mean(dim=1)[:, 0, trunk.num_prefix_tokens:]
    assert (out.cls_attention - reference).abs().max() <= 1e-6
    assert torch.allclose(out.patch_tokens, hidden, atol=1e-5, rtol=0)

    scores = timm_teacher.prompt_aware_attention(pixels, ["a chest x-ray", "a brain mri"])
    assert scores.shape == (2, 196) and (scores >= 0).all()


def test_bad_sources_raise_clear_errors(tmp_path, tiny_dir):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_teacher("ViT-B-16", str(tmp_path / "missing_unimed.pt"))
    with pytest.raises(FileNotFoundError, match="teacher directory not found"):
        load_teacher("local-dir:" + str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="would be ignored"):
        load_teacher("local-dir:" + str(tiny_dir), "weights.pt")


def test_wrong_input_size_is_rejected(teacher):
    with pytest.raises(ValueError, match="native size"):
        teacher.encode(torch.zeros(1, 3, 32, 32))


@pytest.mark.parametrize("vision_cfg, match", [
    ({"layers": [1, 1, 1, 1], "width": 8, "image_size": 64, "head_width": 8}, "ModifiedResNet"),
    ({"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16,
      "attentional_pool": True, "attn_pooler_heads": 2, "attn_pooler_queries": 4},
     "attentional pooling"),
    ({"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16,
      "pool_type": "avg"}, "pool_type"),
    ({"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16,
      "qk_norm": True}, "ResidualAttentionBlock"),
    ({"timm_model_name": "vit_tiny_patch16_224", "timm_pool": "avg", "image_size": 224},
     "global_pool"),
])
def test_unsupported_towers_are_rejected(vision_cfg, match):
    model = open_clip.CLIP(embed_dim=32, vision_cfg=vision_cfg, text_cfg=TEXT_CFG)
    with pytest.raises(ValueError, match=match):
        ExpertTeacher(model, preprocess=None, tokenizer=None)


def test_concurrent_encodes_from_threads_do_not_mix(teacher):
    """Hooks live on shared modules; each call must only see its own forward."""
    inputs = [torch.randn(16, 3, 64, 64, generator=torch.Generator().manual_seed(i))
              for i in range(4)]
    expected = [teacher.encode(x).cls_attention for x in inputs]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda x: teacher.encode(x).cls_attention, inputs * 3))
    for i, result in enumerate(results):
        assert torch.allclose(result, expected[i % 4], atol=1e-6, rtol=0)


def test_mixed_precision_teacher(tiny_dir, teacher, pixels):
    half = load_teacher("local-dir:" + str(tiny_dir), precision="fp16")
    out, ref = half.encode(pixels), teacher.encode(pixels)
    assert half.dtype == torch.float16 and out.patch_tokens.dtype == torch.float32
    assert torch.allclose(out.cls_attention, ref.cls_attention, atol=1e-3)
    assert half.identity != teacher.identity  # other bytes, other (slightly) targets
