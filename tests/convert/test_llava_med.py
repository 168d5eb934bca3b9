"""`medalign convert llava-med`: an original-layout LLaVA-Med folder becomes a transformers LLaVA.

The tiny source is written in the release's exact layout (llava_mistral config with the mm_*
keys, fp16 safetensors shards + index json, sentencepiece tokenizer, a CLIP vision-tower
folder). The converted model must load through ``load_student`` and reproduce logits computed
independently from the same tensors: transformers' CLIP vision model + the mlp2x_gelu
projector written out + transformers' Mistral, with the image features spliced in by hand.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from real_formats import CLIP_MEAN, CLIP_STD, tiny_llava_med

from medalign_platform.convert.llava_med import convert_llava_med
from medalign_platform.convert.sources import ConversionError, TensorSource
from medalign_platform.core.student import image_token_id, load_student, visual_grid
from medalign_platform.core.tap import DistillationTap
from medalign_platform.data.prompts import render_prompt

QUESTION = "is there a lesion in the left lung ?"


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return tiny_llava_med(tmp_path_factory.mktemp("release"))


@pytest.fixture(scope="module")
def converted(tmp_path_factory, release):
    src, vision = release
    return convert_llava_med(src, tmp_path_factory.mktemp("out") / "llava-med-hf", vision)


def _reference_logits(src, vision_dir, input_ids, pixel_values, image_id):
    """Logits from the source tensors without LlavaForConditionalGeneration or the converter."""
    from transformers import CLIPVisionModel, MistralConfig, MistralForCausalLM

    config = json.loads((src / "config.json").read_text())
    source = TensorSource(src)
    weights = {k: source.take(k).float() for k in source.keys()}
    # The converter stores the tower in the checkpoint's dtype (fp16), as LLaVA runs it.
    vision = CLIPVisionModel.from_pretrained(vision_dir).half().float().eval()
    text = MistralConfig(**{k: v for k, v in config.items() if not k.startswith("mm_") and k != "model_type"})
    llm = MistralForCausalLM(text).eval()
    llm.load_state_dict({k: v for k, v in weights.items() if not k.startswith("model.mm_projector.")})
    with torch.no_grad():
        hidden = vision(pixel_values=pixel_values, output_hidden_states=True).hidden_states
        patches = hidden[config["mm_vision_select_layer"]][:, 1:]  # select_feature "patch": CLS dropped
        features = F.linear(F.gelu(F.linear(patches, weights["model.mm_projector.0.weight"],
                                            weights["model.mm_projector.0.bias"])),
                            weights["model.mm_projector.2.weight"], weights["model.mm_projector.2.bias"])
        is_image = input_ids == image_id
        embeds = llm.model.embed_tokens(input_ids.clamp_max(text.vocab_size - 1))
        embeds[is_image] = features.reshape(-1, features.shape[-1])
        return llm(inputs_embeds=embeds).logits


def test_converted_model_loads_and_reproduces_the_original_logits(converted, release):
    src, vision_dir = release
    model, processor = load_student(converted)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert model.config.text_config.model_type == "mistral"
    assert visual_grid(model) == (4, 4)
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    assert image_token_id(model) == vocab  # <image> appended after the released vocabulary
    assert model.config.text_config.vocab_size == 448  # vocab + 1 padded to a multiple of 64

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 32, 3), dtype=np.uint8))
    prompt = render_prompt(QUESTION, processor)
    batch = processor(images=image, text=prompt, return_tensors="pt")
    assert int((batch["input_ids"] == vocab).sum()) == 16
    with torch.no_grad():
        logits = model(**batch).logits
    reference = _reference_logits(src, vision_dir, batch["input_ids"], batch["pixel_values"], vocab)
    assert torch.allclose(logits[..., :vocab], reference, atol=1e-4, rtol=1e-4)
    # New rows (the image token, padding) score like the mean output row: never preferred.
    assert logits[..., vocab:].std(dim=-1).max() < 1e-4


def test_processor_pads_to_square_with_the_mean_colour_and_uses_the_mistral_prompt(converted):
    _, processor = load_student(converted)
    assert processor.image_processor.do_pad
    rng = np.random.default_rng(1)
    wide = Image.fromarray(rng.integers(0, 256, (20, 32, 3), dtype=np.uint8))  # 32 wide, 20 high
    pixels = processor.image_processor(wide, return_tensors="pt")["pixel_values"][0]
    # LLaVA's expand2square, independently: a mean-colour square, the image pasted centred.
    square = Image.new("RGB", (32, 32), tuple(int(255 * m) for m in CLIP_MEAN))
    square.paste(wide, (0, (32 - 20) // 2))
    expected = (torch.from_numpy(np.asarray(square, dtype=np.float32) / 255.0).permute(2, 0, 1)
                - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    assert torch.allclose(pixels, expected, atol=1e-5)
    assert render_prompt(QUESTION, processor) == f"[INST] <image>\n{QUESTION} [/INST]"
    ids = processor(images=wide, text=render_prompt(QUESTION, processor))["input_ids"][0]
    assert ids[0] == processor.tokenizer.bos_token_id  # the tokenizer adds <s>, the template does not


def test_tap_finds_span_and_queries_on_the_converted_student(converted):
    model, processor = load_student(converted, attn_implementation="eager")
    image = Image.new("RGB", (24, 40), (200, 10, 10))
    batch = processor(images=image, text=render_prompt(QUESTION, processor), return_tensors="pt")
    tap = DistillationTap(model, 2)
    with torch.no_grad():
        out = model(**batch, output_attentions=True)
    captured = tap.pop()
    positions = (batch["input_ids"][0] == image_token_id(model)).nonzero().flatten()
    queries = torch.arange(int(positions[-1]) + 1, batch["input_ids"].shape[1])
    reference = out.attentions[2].mean(1)[0][queries][:, positions].mean(0)
    assert captured.attention.shape == (1, 16)
    assert torch.allclose(captured.attention[0], reference, atol=1e-5)


def test_vision_weights_from_the_checkpoint_or_the_tower_agree(tmp_path):
    src, vision = tiny_llava_med(tmp_path / "a", with_vision_weights=True)
    with_weights = convert_llava_med(src, tmp_path / "from_checkpoint", vision)
    marker = json.loads((with_weights / "medalign_convert.json").read_text())
    assert marker["vision_tower_weights"] == "checkpoint"
    plain_src, _ = tiny_llava_med(tmp_path / "b")
    plain = convert_llava_med(plain_src, tmp_path / "from_tower", vision)
    a, _ = load_student(with_weights)
    b, _ = load_student(plain)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        if "vision_tower" in name:
            assert torch.equal(x, y), name


def test_bin_shards_load_with_weights_only_and_convert_identically(tmp_path, converted):
    src, vision = tiny_llava_med(tmp_path / "bin", weights="bin")
    out = convert_llava_med(src, tmp_path / "from_bin", vision)
    a, _ = load_student(out)
    b, _ = load_student(converted)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_output_is_sharded_by_size_and_every_tensor_is_indexed(tmp_path, release):
    src, vision = release
    out = convert_llava_med(src, tmp_path / "small_shards", vision, max_shard_bytes=64 * 1024)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and all((out / name).is_file() for name in shards)
    model, _ = load_student(out)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_leftover_and_missing_tensors_are_named_and_nothing_is_written(tmp_path):
    src, vision = tiny_llava_med(tmp_path / "extra", extra={"model.vision_resampler.weight": torch.zeros(2)})
    with pytest.raises(ConversionError, match=r"model\.vision_resampler\.weight"):
        convert_llava_med(src, tmp_path / "out", vision)
    assert not (tmp_path / "out").exists()
    src, vision = tiny_llava_med(tmp_path / "missing", drop=("model.layers.1.mlp.up_proj.weight",))
    with pytest.raises(ConversionError, match=r"missing \['language_model\.model\.layers\.1\.mlp\.up_proj\.weight'\]"):
        convert_llava_med(src, tmp_path / "out", vision)
    assert not (tmp_path / "out").exists()


def test_config_problems_name_the_key(tmp_path, release):
    src, vision = release
    config = json.loads((src / "config.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("tokenizer.model", "tokenizer_config.json", "model.safetensors.index.json",
                 "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        (bad / name).symlink_to(src / name)
    (bad / "config.json").write_text(json.dumps({**config, "mm_projector_type": "linear"}))
    with pytest.raises(ConversionError, match="mm_projector_type='linear'"):
        convert_llava_med(bad, tmp_path / "out", vision)
    (bad / "config.json").write_text(json.dumps({**config, "mm_vision_tower": "openai/clip-vit-large-patch14-336"}))
    with pytest.raises(ConversionError, match="not a local folder.*medalign convert llava-med SRC OUT DIR"):
        convert_llava_med(bad, tmp_path / "out")
    (bad / "config.json").write_text(json.dumps({**config, "mm_hidden_size": 1024}))
    with pytest.raises(ConversionError, match="mm_hidden_size=1024"):
        convert_llava_med(bad, tmp_path / "out", vision)
