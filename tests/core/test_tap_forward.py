"""The tap reads q and k from the forward itself: train-mode LoRA dropout, handed-over layouts, checkpointing."""

from __future__ import annotations

import pytest
import torch
from conftest import make_batch

from medalign_platform.core.objective import DistillSettings, MedAlignObjective
from medalign_platform.core.student import (
    LoraSettings,
    apply_lora,
    enable_gradient_checkpointing,
    image_token_id,
    load_student,
)
from medalign_platform.core.tap import DistillationTap, SpanLayout, find_visual_positions, text_query_mask

NUM_VISUAL = 64


def _lora_student(tiny_student_dir, dropout: float, implementation: str = "eager"):
    model, processor = load_student(tiny_student_dir, attn_implementation=implementation)
    torch.manual_seed(1)
    model = apply_lora(model, LoraSettings(rank=4, alpha=8, dropout=dropout))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # a non-zero update, so dropout on the LoRA input changes q and k
            param.data.normal_(0, 0.5)
    return model, processor


def _attention_of(output, batch, model, layer):
    """Text-to-image attention from ``output.attentions[layer]`` (head- and query-averaged)."""
    probs = output.attentions[layer].float().mean(dim=1)
    positions = find_visual_positions(batch["input_ids"], image_token_id(model), NUM_VISUAL)
    queries = text_query_mask(positions, batch["attention_mask"], batch.get("labels"), batch["input_ids"].shape[1])
    return torch.stack([probs[i][queries[i]][:, positions[i]].mean(dim=0) for i in range(len(probs))])


@pytest.mark.parametrize("dropout", [0.05, 0.3])
def test_train_mode_attention_is_the_attention_of_the_same_forward(tiny_student_dir, random_images, dropout):
    """With LoRA dropout active the tap must see the mask the block used, not a fresh one."""
    model, processor = _lora_student(tiny_student_dir, dropout)
    model.train()
    batch = make_batch(processor, random_images, "right")
    tap = DistillationTap(model, 2)
    with torch.no_grad():
        output = model(**batch, output_attentions=True)
    reference = _attention_of(output, batch, model, 2)
    captured = tap.pop().attention
    assert (captured - reference).abs().max() <= 1e-6
    # Dropout is really active: a second forward (fresh masks) gives a visibly different map.
    with torch.no_grad():
        again = _attention_of(model(**batch, output_attentions=True), batch, model, 2)
    assert (again - reference).abs().max() > 1e-4
    tap.remove()


def test_attention_gradients_reach_q_and_k_lora_weights(tiny_student_dir, random_images):
    model, processor = _lora_student(tiny_student_dir, 0.1, implementation="sdpa")
    model.train()
    batch = make_batch(processor, random_images, "left")
    tap = DistillationTap(model, 2)
    model(**batch)
    tap.pop().attention.pow(2).sum().backward()
    grads = {name: param.grad for name, param in model.named_parameters() if param.requires_grad}
    layer2 = [name for name in grads if ".layers.2.self_attn." in name and ("q_proj" in name or "k_proj" in name)]
    assert layer2 and all(grads[name] is not None and grads[name].abs().sum() > 0 for name in layer2)
    later = [name for name in grads if ".layers.3." in name]
    assert all(grads[name] is None for name in later)  # the capture stops at block 2's attention
    tap.remove()


@pytest.mark.parametrize("capture", [True, False])
def test_a_handed_over_layout_gives_the_same_capture_as_locating_it(tiny_student_dir, random_images, capture):
    model, processor = load_student(tiny_student_dir)
    model.eval()
    batch = make_batch(processor, random_images, "left")
    tap = DistillationTap(model, 2, capture_attention=capture)
    with torch.no_grad():
        model(**batch)
        located = tap.pop()
        layout = tap.locator()(batch["input_ids"], batch["attention_mask"], batch["labels"])
        assert isinstance(layout, SpanLayout) and layout.has_queries == capture
        tap.expect(layout)
        model(**batch)
        handed = tap.pop()
    assert torch.equal(located.visual_states, handed.visual_states)
    if capture:
        assert torch.equal(located.attention, handed.attention)
    else:
        assert located.attention is None and handed.attention is None
    # A layout of another shape is ignored (the tap locates the span itself).
    tap.expect(tap.locator()(batch["input_ids"][:1], batch["attention_mask"][:1], batch["labels"][:1]))
    with torch.no_grad():
        model(**batch)
    assert torch.equal(tap.pop().visual_states, located.visual_states)
    tap.remove()


def test_the_locator_fails_with_the_taps_message(tiny_student_dir, random_images):
    model, processor = load_student(tiny_student_dir)
    batch = dict(processor(images=random_images[:1], text=["USER: <image>"], return_tensors="pt"))
    labels = batch["input_ids"].clone()
    labels[:, : int(batch["input_ids"].shape[1]) - 2] = -100
    tap = DistillationTap(model, 2)
    with pytest.raises(ValueError, match="no prompt text after the image.*lambda_attn=0"):
        tap.locator()(batch["input_ids"], batch["attention_mask"], labels)
    tap.remove()


def test_gradient_checkpointing_gives_the_same_losses_and_gradients(tiny_student_dir, random_images):
    """Non-reentrant checkpointing replays blocks in backward; the hooks must not change a value."""
    from conftest import random_teacher_targets

    results = []
    for checkpointing in (False, True):
        model, processor = _lora_student(tiny_student_dir, 0.2, implementation="sdpa")
        if checkpointing:
            enable_gradient_checkpointing(model)
        model.train()
        objective = MedAlignObjective(model, DistillSettings(layer=2, lambda_align=1.0, lambda_attn=0.5))
        batch = make_batch(processor, random_images, "left")
        torch.manual_seed(7)  # the same dropout masks in both runs (checkpointing restores the RNG on replay)
        terms = objective(batch, random_teacher_targets(3, grid=(4, 4)))
        terms["loss"].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append(({k: float(v.detach()) for k, v in terms.items()}, grads))
        objective.remove()
    (plain_terms, plain_grads), (ckpt_terms, ckpt_grads) = results
    for key in ("loss", "lm", "spatial", "attention"):
        assert ckpt_terms[key] == pytest.approx(plain_terms[key], rel=1e-6), key
    assert plain_grads.keys() == ckpt_grads.keys()
    for name in plain_grads:
        assert torch.allclose(plain_grads[name], ckpt_grads[name], rtol=1e-5, atol=1e-7), name
