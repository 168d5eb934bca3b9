"""Student loading, LoRA placement, span finding, the layer-L tap and the steer adapter."""

from __future__ import annotations

import pytest
import torch
from conftest import make_batch

from medalign_platform.core.student import (
    LoraSettings,
    SteerSettings,
    apply_lora,
    attach_steer,
    check_layer,
    decoder_layers,
    image_token_id,
    load_student,
    lora_target_names,
    visual_grid,
)
from medalign_platform.core.tap import DistillationTap, find_visual_positions, text_query_mask

NUM_VISUAL = 64  # tiny student: 32 px / patch 4 -> 8 x 8


@pytest.fixture()
def student(tiny_student_dir):
    model, processor = load_student(tiny_student_dir)
    return model.eval(), processor


def _eager_reference(model, batch, layer):
    """Text-to-image attention from eager attention's output_attentions at ``layer``."""
    out = model(**batch, output_attentions=True, output_hidden_states=True)
    probs = out.attentions[layer].mean(dim=1)  # [B, T, T] averaged over heads
    positions = find_visual_positions(batch["input_ids"], image_token_id(model), NUM_VISUAL)
    queries = text_query_mask(positions, batch["attention_mask"], batch.get("labels"), batch["input_ids"].shape[1])
    rows = [probs[i][queries[i]][:, positions[i]].mean(dim=0) for i in range(len(probs))]
    visual = out.hidden_states[layer].gather(1, positions[:, :, None].expand(-1, -1, out.hidden_states[layer].shape[-1]))
    return torch.stack(rows), visual


def test_tiny_student_round_trips_through_the_real_loader(tiny_student_dir, random_images):
    model, processor = load_student(tiny_student_dir)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert type(processor).__name__ == "LlavaProcessor"
    assert visual_grid(model) == (8, 8)
    batch = processor(images=random_images[0], text="USER: <image>\nis there a lesion ?", return_tensors="pt")
    assert int((batch["input_ids"] == image_token_id(model)).sum()) == NUM_VISUAL
    # A second load gives bit-identical weights: the checkpoint, not chance, defines the model.
    again, _ = load_student(tiny_student_dir)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_load_student_names_a_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_student(tmp_path / "nowhere")


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_visual_span_found_per_sample_with_padding(student, random_images, padding_side):
    model, processor = student
    batch = make_batch(processor, random_images, padding_side)
    positions = find_visual_positions(batch["input_ids"], image_token_id(model), NUM_VISUAL)
    pad = (batch["attention_mask"] == 0).sum(dim=1)
    # Prompt is "<s> USER : <image>...": the span starts 3 real tokens in, after any left padding.
    expected_start = pad + 3 if padding_side == "left" else torch.full_like(pad, 3)
    assert torch.equal(positions[:, 0], expected_start)
    assert torch.equal(positions, positions[:, :1] + torch.arange(NUM_VISUAL))
    assert len(set(pad.tolist())) > 1, "the batch must mix prompt lengths"


def test_visual_span_errors_name_the_problem():
    image = 7
    ids = torch.tensor([[1, image, image, 2, 3], [1, 2, image, image, 3]])
    assert find_visual_positions(ids, image, 2).tolist() == [[1, 2], [2, 3]]
    with pytest.raises(ValueError, match=r"exactly one image of 3 image tokens.*\(0, 2\)"):
        find_visual_positions(ids, image, 3)
    split = torch.tensor([[image, 1, image, 2]])
    with pytest.raises(ValueError, match="not contiguous"):
        find_visual_positions(split, image, 2)


def test_text_queries_stop_before_the_answer_and_skip_padding():
    positions = torch.tensor([[2, 3], [1, 2]])
    attention_mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 0]])
    labels = torch.tensor([[-100] * 6 + [5, 6], [-100] * 5 + [5, 6, -100]])
    mask = text_query_mask(positions, attention_mask, labels, 8)
    assert mask.int().tolist() == [[0, 0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 0, 0, 0]]
    # Without labels (inference) the prompt runs to the last real token.
    mask = text_query_mask(positions, attention_mask, None, 8)
    assert mask.int().tolist() == [[0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1, 0]]


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("layer", [1, 2, 3])
def test_recomputed_attention_matches_eager_output_attentions(tiny_student_dir, random_images, padding_side, layer):
    model, processor = load_student(tiny_student_dir, attn_implementation="eager")
    model.eval()
    batch = make_batch(processor, random_images, padding_side)
    tap = DistillationTap(model, layer)
    with torch.no_grad():
        reference, reference_visual = _eager_reference(model, batch, layer)
    captured = tap.pop()
    assert captured.attention.shape == (3, NUM_VISUAL)
    assert (captured.attention - reference).abs().max() <= 1e-5
    assert torch.equal(captured.visual_states, reference_visual)  # HF hidden_states[L] on the span
    # Queries attend to text too, so image mass is a proper part of each probability row.
    assert torch.all((captured.attention.sum(dim=1) > 0) & (captured.attention.sum(dim=1) < 1))


def test_sdpa_model_with_lora_gives_the_same_attention_as_eager(tiny_student_dir, random_images):
    """The tap keeps SDPA everywhere yet reports eager attention's probabilities, LoRA included."""
    results = []
    for implementation in ("sdpa", "eager"):
        model, processor = load_student(tiny_student_dir, attn_implementation=implementation)
        torch.manual_seed(1)  # same LoRA A init in both models
        model = apply_lora(model, LoraSettings(rank=4, alpha=8, dropout=0.0))
        for name, param in model.named_parameters():
            if "lora_B" in name:  # non-zero LoRA so the adapter changes q and k
                param.data.normal_(0, 0.5)
        model.eval()
        batch = make_batch(processor, random_images, "left")
        tap = DistillationTap(model, 2)
        with torch.no_grad():
            if implementation == "eager":
                reference, _ = _eager_reference(model, batch, 2)
            else:
                model(**batch)
        results.append(tap.pop().attention)
    assert (results[0] - results[1]).abs().max() <= 1e-5
    assert (results[1] - reference).abs().max() <= 1e-5


@pytest.mark.parametrize("layer", [0, 4, -1, 2.5])
def test_layer_outside_the_model_names_the_valid_range(student, layer):
    model, _ = student
    with pytest.raises(ValueError, match=r"4 decoder layers.*1\.\.3"):
        check_layer(layer, len(decoder_layers(model)))
    with pytest.raises(ValueError, match=r"1\.\.3"):
        DistillationTap(model, layer)


def test_lora_goes_on_llm_linear_layers_only(student):
    model, _ = student
    names = lora_target_names(model, LoraSettings())
    assert len(names) == 4 * 7
    assert all(".language_model.layers." in name for name in names)
    peft_model = apply_lora(model, LoraSettings(rank=2, layers_to_transform=[1, 3]))
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert {name.split(".layers.")[1].split(".")[0] for name in trainable} == {"1", "3"}
    assert not any(("vision_tower" in n or "multi_modal_projector" in n or "lm_head" in n) for n in trainable)
    # rank r and 7 modules per layer: A is [r, in], B is [out, r]
    rank = peft_model.peft_config["default"].r
    assert rank == 2 and len(trainable) == 2 * 7 * 2


def test_lora_settings_reject_bad_values():
    with pytest.raises(ValueError, match="rank must be >= 1"):
        LoraSettings(rank=0)
    with pytest.raises(ValueError, match="unknown names"):
        LoraSettings(target_modules=("q_proj", "fc1"))
    with pytest.raises(ValueError, match="steer.mode"):
        SteerSettings(mode="diagonal")


@pytest.mark.parametrize("mode,expected_params", [("full", 64 * 64), ("low_rank", 2 * 64 * 8)])
def test_steer_adapter_starts_at_the_base_model_and_moves_visual_tokens_only(
    student, random_images, mode, expected_params
):
    model, processor = student
    batch = make_batch(processor, random_images, "left")
    with torch.no_grad():
        base_logits = model(**batch).logits
    steer = attach_steer(model, SteerSettings(mode=mode, rank=8, eps=0.5))
    assert sum(p.numel() for p in steer.parameters()) == expected_params
    tap = DistillationTap(model, 2, steer=steer, capture_attention=False)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, base_logits)  # zero init: exactly the base model
        for param in steer.parameters():
            param.normal_(0, 0.1)
        inputs = {}
        handle = decoder_layers(model)[2].register_forward_pre_hook(
            lambda module, args: inputs.setdefault("hidden", args[0])
        )
        steered_logits = model(**batch).logits
        handle.remove()
    captured = tap.pop()
    tap.remove()
    with torch.no_grad():
        plain = model(**batch, output_hidden_states=True).hidden_states[2]
    positions = find_visual_positions(batch["input_ids"], image_token_id(model), NUM_VISUAL)
    plain_visual = plain.gather(1, positions[:, :, None].expand(-1, -1, plain.shape[-1]))
    weight = steer.weight if mode == "full" else steer.up @ steer.down
    expected = plain_visual + 0.5 * plain_visual @ weight.T
    assert torch.allclose(captured.visual_states, expected, atol=1e-5)
    # Block L sees the steered visual tokens; every text token is unchanged.
    text = torch.ones_like(batch["input_ids"], dtype=torch.bool)
    text.scatter_(1, positions, False)
    assert torch.equal(inputs["hidden"][text], plain[text])
    assert not torch.allclose(steered_logits, base_logits)


def test_generation_runs_through_the_tap(student, random_images):
    """Cached decoding steps carry no image tokens and must pass through untouched."""
    model, processor = student
    batch = make_batch(processor, random_images[:2], "left", with_answers=False)
    tap = DistillationTap(model, 2)
    with torch.no_grad():
        tokens = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert tokens.shape == (2, batch["input_ids"].shape[1] + 3)
    # The capture left after generate() is the prefill's: the prompt's attention at layer L.
    prefill = tap.pop()
    with torch.no_grad():
        model(**batch)
    assert torch.allclose(prefill.attention, tap.pop().attention, atol=1e-6)
    tap.remove()


def test_missing_prompt_text_after_the_image_is_a_clear_error(student, random_images):
    model, processor = student
    batch = dict(processor(images=random_images[:1], text=["USER: <image>"], return_tensors="pt"))
    batch["labels"] = batch["input_ids"].clone()  # the answer starts right after the image
    batch["labels"][:, : int(batch["input_ids"].shape[1]) - 2] = -100
    tap = DistillationTap(model, 2)
    with pytest.raises(ValueError, match="no prompt text after the image.*lambda_attn=0"):
        model(**batch)
    tap.remove()
    DistillationTap(model, 2, capture_attention=False)  # without attention capture it is fine
    model(**batch)
