"""Real teacher families on tiny copies in their release formats: BiomedCLIP (open_clip hub
schema, timm ViT + Hugging Face BERT) and PubMedCLIP (transformers CLIPModel).

For each, the teacher targets must equal what the library's own forward returns: timm's
``forward_intermediates`` and unfused attention for BiomedCLIP, ``output_hidden_states`` /
``output_attentions`` for PubMedCLIP; and the prompt-aware map must work through the text tower.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from real_formats import tiny_biomedclip, tiny_pubmedclip

from medalign_platform.core.teacher import load_teacher
from medalign_platform.core.towers import HFCLIPVision, TimmViT

QUESTIONS = ["is there a lesion in the left lung ?", "what organ is shown in this image ?"]


@pytest.fixture(scope="module")
def biomedclip_dir(tmp_path_factory):
    return tiny_biomedclip(tmp_path_factory.mktemp("biomedclip"))


@pytest.fixture(scope="module")
def pubmedclip_dir(tmp_path_factory):
    return tiny_pubmedclip(tmp_path_factory.mktemp("pubmedclip"))


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(3)
    return [Image.fromarray(rng.integers(0, 256, (240, 260, 3), dtype=np.uint8)) for _ in range(2)]


def test_biomedclip_schema_targets_equal_timm_forward(biomedclip_dir, images):
    import open_clip

    teacher = load_teacher("local-dir:" + str(biomedclip_dir))
    assert isinstance(teacher._tower, TimmViT)
    assert teacher.grid == (14, 14) and teacher.width == 192
    assert isinstance(teacher.tokenizer, open_clip.tokenizer.HFTokenizer)  # the folder's BERT WordPiece
    pixels = teacher.pixel_values(images)
    out = teacher.encode(pixels)

    trunk = teacher.model.visual.trunk
    attn = trunk.blocks[-1].attn
    captured = {}
    handle = attn.attn_drop.register_forward_hook(lambda _m, inputs, _out: captured.update(probs=inputs[0]))
    fused, attn.fused_attn = attn.fused_attn, False  # timm's unfused path materialises the softmax
    try:
        with torch.no_grad():
            last = trunk.forward_intermediates(pixels, indices=1, output_fmt="NLC", intermediates_only=True,
                                               norm=False)[-1]
    finally:
        attn.fused_attn = fused
        handle.remove()
    assert torch.allclose(out.patch_tokens, last, atol=1e-5, rtol=0)
    reference = captured["probs"].mean(dim=1)[:, 0, trunk.num_prefix_tokens:]
    assert (out.cls_attention - reference).abs().max() <= 1e-6


def test_biomedclip_prompt_aware_map_uses_the_bert_text_tower(biomedclip_dir, images):
    teacher = load_teacher("local-dir:" + str(biomedclip_dir))
    pixels = teacher.pixel_values(images)
    text = teacher.encode_questions(QUESTIONS)
    with torch.no_grad():
        tokens = teacher.tokenizer(QUESTIONS)
        direct = teacher.model.encode_text(tokens, normalize=True)
    assert torch.allclose(text, direct, atol=1e-6)
    scores = teacher.prompt_aware_attention(pixels, QUESTIONS)
    assert scores.shape == (2, 196) and (scores >= 0).all() and scores.max() > 0
    swapped = teacher.prompt_aware_attention(pixels, QUESTIONS[::-1])
    assert not torch.allclose(scores, swapped)
    # Batched PIL route = pixel route.
    assert torch.allclose(teacher.encode_prompt_aware(images, QUESTIONS, batch_size=1), scores, atol=1e-6)


def test_pubmedclip_targets_equal_transformers_outputs(pubmedclip_dir, images):
    from transformers import CLIPModel

    teacher = load_teacher("hf-clip:" + str(pubmedclip_dir))
    assert isinstance(teacher._tower, HFCLIPVision)
    assert teacher.grid == (7, 7) and teacher.width == 32 and teacher.image_size == (224, 224)
    pixels = teacher.pixel_values(images)
    assert pixels.shape == (2, 3, 224, 224)
    out = teacher.encode(pixels)

    eager = CLIPModel.from_pretrained(pubmedclip_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        reference = eager.vision_model(pixel_values=pixels, output_attentions=True, output_hidden_states=True)
    # hidden_states[-1] is the last layer's output, before post_layernorm.
    assert torch.allclose(out.patch_tokens, reference.hidden_states[-1][:, 1:], atol=1e-6, rtol=0)
    cls_row = reference.attentions[-1].mean(dim=1)[:, 0]  # [B, 1 + 49], heads averaged
    assert (out.cls_attention - cls_row[:, 1:]).abs().max() <= 1e-6
    assert torch.allclose(out.cls_attention.sum(-1) + cls_row[:, 0], torch.ones(2), atol=1e-5)


def test_pubmedclip_prompt_aware_map_and_exact_cls_split(pubmedclip_dir, images):
    teacher = load_teacher("hf-clip:" + str(pubmedclip_dir))
    pixels = teacher.pixel_values(images)
    scores = teacher.prompt_aware_attention(pixels, QUESTIONS)
    assert scores.shape == (2, 49) and (scores >= 0).all() and scores.max() > 0
    assert not torch.allclose(scores, teacher.prompt_aware_attention(pixels, QUESTIONS[::-1]))
    # The per-token split of the CLS attention output is exact (what the map is built on).
    layer = teacher.model.vision_model.encoder.layers[-1]
    with teacher._capture() as store, torch.no_grad():
        teacher._tower.image_embedding(pixels)
        attn_out, _ = layer.self_attn(store["attn_in"])
        probs = teacher._cls_attention_heads(store["attn_in"])
        contributions = teacher._cls_patch_contributions(store["attn_in"], probs)
    rebuilt = contributions.sum(1) + layer.self_attn.out_proj.bias
    assert torch.allclose(rebuilt, attn_out[:, 0], atol=1e-5)
    # Text embeddings are the model's own get_text_features, normalised.
    tokens = teacher.tokenizer(QUESTIONS, padding=True, return_tensors="pt")
    with torch.no_grad():
        own = teacher.model.get_text_features(**tokens).pooler_output
    assert torch.allclose(teacher.encode_questions(QUESTIONS), torch.nn.functional.normalize(own, dim=-1), atol=1e-6)


def test_identity_is_route_independent_and_weight_sensitive(tmp_path, pubmedclip_dir):
    import shutil

    from safetensors.torch import load_file, save_file

    first = load_teacher("hf-clip:" + str(pubmedclip_dir))
    moved = shutil.copytree(pubmedclip_dir, tmp_path / "moved")
    assert load_teacher("hf-clip:" + str(moved)).identity == first.identity
    weights = load_file(str(moved / "model.safetensors"))
    weights["vision_model.post_layernorm.weight"][0] += 1e-3
    save_file(weights, str(moved / "model.safetensors"), metadata={"format": "pt"})
    assert load_teacher("hf-clip:" + str(moved)).identity != first.identity


def test_hf_clip_source_errors(tmp_path, pubmedclip_dir):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_teacher("hf-clip:" + str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="would be ignored"):
        load_teacher("hf-clip:" + str(pubmedclip_dir), "weights.pt")
