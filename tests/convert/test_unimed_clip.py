"""`medalign convert unimed-clip`: a fork-layout .pt becomes an upstream open_clip local-dir.

The reference is computed independently from the source tensors, with the fork's forward
written out functionally (QuickGELU ViT, CLS pooling, BERT CLS + MLP projection)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
import torch.nn.functional as F
from real_formats import tiny_bert, tiny_unimed_pt, unimed_vision_state
from safetensors import safe_open

from medalign_platform.convert.sources import ConversionError
from medalign_platform.convert.unimed_clip import convert_unimed_clip
from medalign_platform.core.teacher import load_teacher

HEADS = 2  # width 128 / head width 64
QUESTIONS = ["is there a lesion in the left lung ?", "what organ is shown ?"]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return tiny_bert(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def release(tmp_path_factory, bert_dir):
    return tiny_unimed_pt(tmp_path_factory.mktemp("unimed") / "unimed_clip_vit_tiny.pt", bert_dir=bert_dir)


def _fork_vision_forward(state: dict, pixels: torch.Tensor):
    """The fork's VisualTransformer forward, from raw tensors: (last block output, CLS attention, embedding)."""
    width = state["visual.conv1.weight"].shape[0]
    patch = state["visual.conv1.weight"].shape[-1]
    x = F.conv2d(pixels, state["visual.conv1.weight"], stride=patch).flatten(2).transpose(1, 2)
    x = torch.cat([state["visual.class_embedding"].expand(x.shape[0], 1, -1), x], dim=1)
    x = x + state["visual.positional_embedding"]
    x = F.layer_norm(x, (width,), state["visual.ln_pre.weight"], state["visual.ln_pre.bias"])
    layers = len({k.split(".")[3] for k in state if k.startswith("visual.transformer.resblocks.")})
    for i in range(layers):
        p = f"visual.transformer.resblocks.{i}."
        y = F.layer_norm(x, (width,), state[p + "ln_1.weight"], state[p + "ln_1.bias"]).transpose(0, 1)
        out, weights = F.multi_head_attention_forward(
            y, y, y, width, HEADS, state[p + "attn.in_proj_weight"], state[p + "attn.in_proj_bias"], None, None,
            False, 0.0, state[p + "attn.out_proj.weight"], state[p + "attn.out_proj.bias"], training=False,
            need_weights=True, average_attn_weights=True)
        x = x + out.transpose(0, 1)
        h = F.layer_norm(x, (width,), state[p + "ln_2.weight"], state[p + "ln_2.bias"])
        h = F.linear(h, state[p + "mlp.c_fc.weight"], state[p + "mlp.c_fc.bias"])
        h = h * torch.sigmoid(1.702 * h)  # QuickGELU, as UniMed-CLIP is run (force_quick_gelu=True)
        x = x + F.linear(h, state[p + "mlp.c_proj.weight"], state[p + "mlp.c_proj.bias"])
    pooled = F.layer_norm(x[:, 0], (width,), state["visual.ln_post.weight"], state["visual.ln_post.bias"])
    return x, weights, pooled @ state["visual.proj"]


def _source_state(path) -> dict:
    raw = torch.load(path, weights_only=True)["state_dict"]
    return {k[len("module."):]: v for k, v in raw.items()}


def test_converted_vision_tower_reproduces_the_fork_forward(tmp_path, release, bert_dir):
    out = convert_unimed_clip(release, tmp_path / "unimed", text_encoder=bert_dir, context_length=32)
    config = json.loads((out / "open_clip_config.json").read_text())
    assert config["model_cfg"]["quick_gelu"] is True
    assert config["model_cfg"]["vision_cfg"] == {"image_size": 64, "layers": 2, "width": 128, "head_width": 64,
                                                 "mlp_ratio": 4.0, "patch_size": 16}
    assert config["medalign"]["text_tower"] == "present"
    assert not list(out.glob("*.pt")) and not list(out.glob("*.bin"))  # safetensors only
    teacher = load_teacher("local-dir:" + str(out))
    assert teacher.grid == (4, 4) and teacher.has_text

    state = _source_state(release)
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    last, weights, embedding = _fork_vision_forward(state, pixels)
    targets = teacher.encode(pixels)
    assert torch.allclose(targets.patch_tokens, last[:, 1:], atol=1e-4, rtol=1e-5)
    assert (targets.cls_attention - weights[:, 0, 1:]).abs().max() <= 1e-6
    with torch.no_grad():
        assert torch.allclose(teacher.model.encode_image(pixels), embedding, atol=1e-4, rtol=1e-5)


def test_text_tower_is_kept_and_matches_bert_plus_projection(tmp_path, release, bert_dir):
    from transformers import BertModel, BertTokenizerFast

    out = convert_unimed_clip(release, tmp_path / "unimed", text_encoder=bert_dir, context_length=32)
    teacher = load_teacher("local-dir:" + str(out))
    state = _source_state(release)
    bert = BertModel.from_pretrained(bert_dir, add_pooling_layer=False)
    bert.load_state_dict({k[len("text_encoder.transformer."):]: v for k, v in state.items()
                          if k.startswith("text_encoder.transformer.")})
    tokenizer = BertTokenizerFast.from_pretrained(bert_dir)
    ids = tokenizer(QUESTIONS, padding="max_length", max_length=32, truncation=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        cls = bert(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state[:, 0]
        projected = F.linear(F.gelu(F.linear(cls, state["text_encoder.proj.0.weight"])),
                             state["text_encoder.proj.2.weight"])
    assert torch.allclose(teacher.encode_questions(QUESTIONS), F.normalize(projected, dim=-1), atol=1e-5)
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    scores = teacher.prompt_aware_attention(pixels, QUESTIONS)
    assert scores.shape == (2, 16) and (scores >= 0).all() and scores.max() > 0


def test_vision_only_export_refuses_prompt_aware_attention(tmp_path, release):
    out = convert_unimed_clip(release, tmp_path / "vision_only")
    assert json.loads((out / "open_clip_config.json").read_text())["medalign"]["text_tower"] == "absent"
    teacher = load_teacher("local-dir:" + str(out))
    assert not teacher.has_text
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    _, weights, _ = _fork_vision_forward(_source_state(release), pixels)
    assert (teacher.encode(pixels).cls_attention - weights[:, 0, 1:]).abs().max() <= 1e-6
    with pytest.raises(ValueError, match="no text tower.*teacher.attention=cls"):
        teacher.prompt_aware_attention(pixels, ["a question"])


def test_unknown_tensor_is_named_and_nothing_is_written(tmp_path, bert_dir):
    src = tiny_unimed_pt(tmp_path / "extra.pt", extra={"visual.attn_pool.query": torch.zeros(2, 4)})
    with pytest.raises(ConversionError, match=r"visual\.attn_pool\.query"):
        convert_unimed_clip(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no partial folder left
    other = tiny_unimed_pt(tmp_path / "other.pt", extra={"head.weight": torch.zeros(2)})
    with pytest.raises(ConversionError, match=r"head\.weight.*neither"):
        convert_unimed_clip(other, tmp_path / "out")


def test_bert_position_ids_buffer_is_accounted_for(tmp_path, bert_dir):
    src = tiny_unimed_pt(tmp_path / "old.pt", bert_dir=bert_dir,
                         extra={"text_encoder.transformer.embeddings.position_ids": torch.arange(64)[None]})
    out = convert_unimed_clip(src, tmp_path / "out", text_encoder=bert_dir, context_length=32)
    with safe_open(str(out / "open_clip_model.safetensors"), framework="pt") as handle:
        assert "text.transformer.embeddings.position_ids" not in set(handle.keys())


def test_checkpoint_with_python_objects_is_refused(tmp_path):
    state = {f"module.{k}": v for k, v in unimed_vision_state().items()}
    path = tmp_path / "with_args.pt"
    torch.save({"state_dict": state, "args": argparse.Namespace(lr=1e-4)}, path)
    with pytest.raises(ConversionError, match="weights_only=True"):
        convert_unimed_clip(path, tmp_path / "out")


def test_existing_foreign_folder_is_not_overwritten(tmp_path, release):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(ConversionError, match="not written by"):
        convert_unimed_clip(release, tmp_path / "taken")
    first = convert_unimed_clip(release, tmp_path / "again")
    assert convert_unimed_clip(release, tmp_path / "again") == first  # a conversion output may be replaced
