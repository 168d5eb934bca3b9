"""The MedAlign objective: loss composition, gradient isolation, lambda = 0 equivalence."""

from __future__ import annotations

import pytest
import torch
from conftest import make_batch, random_teacher_targets

from medalign_platform.core.losses import (
    attention_distillation_loss,
    spatial_alignment_loss,
    teacher_attention_map,
    teacher_similarity,
)
from medalign_platform.core.objective import DistillSettings, MedAlignObjective
from medalign_platform.core.student import (
    LoraSettings,
    SteerSettings,
    apply_lora,
    image_token_id,
    load_student,
)
from medalign_platform.core.tap import find_visual_positions

LAYER = 2


def _peft_student(tiny_student_dir, seed=0):
    model, processor = load_student(tiny_student_dir)
    torch.manual_seed(seed)
    model = apply_lora(model, LoraSettings(rank=4, alpha=8, dropout=0.0))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # a trained-looking adapter, so LoRA affects every term
            param.data.normal_(0, 0.05)
    return model, processor


@pytest.fixture()
def setup(tiny_student_dir, random_images):
    model, processor = _peft_student(tiny_student_dir)
    batch = make_batch(processor, random_images, "left")
    return model, batch, random_teacher_targets(len(random_images))


def test_terms_combine_with_the_configured_weights(setup):
    model, batch, teacher = setup
    objective = MedAlignObjective(model, DistillSettings(layer=LAYER, lambda_align=0.7, lambda_attn=0.3))
    terms = objective(batch, teacher)
    assert set(terms) == {"loss", "lm", "spatial", "attention"}
    assert terms["spatial"] > 0 and terms["attention"] > 0
    expected = terms["lm"] + 0.7 * terms["spatial"] + 0.3 * terms["attention"]
    assert torch.allclose(terms["loss"], expected, atol=1e-6)


def test_terms_equal_the_losses_on_hf_hidden_states_and_eager_attention(tiny_student_dir, random_images):
    """Independent path: HF hidden_states[L] and eager output_attentions feed the losses directly."""
    model, processor = load_student(tiny_student_dir, attn_implementation="eager")
    batch = make_batch(processor, random_images, "right")
    teacher = random_teacher_targets(len(random_images))
    settings = DistillSettings(layer=LAYER, lambda_align=1.0, lambda_attn=0.06, attention_normalize="l2")
    objective = MedAlignObjective(model, settings)
    terms = objective(batch, teacher)
    objective.remove()
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True, output_attentions=True)
    positions = find_visual_positions(batch["input_ids"], image_token_id(model), 64)
    hidden = out.hidden_states[LAYER]
    visual = hidden.gather(1, positions[:, :, None].expand(-1, -1, hidden.shape[-1]))
    labels = batch["labels"]
    rows = []
    for i in range(len(labels)):
        answer = int((labels[i] != -100).nonzero()[0])
        probs = out.attentions[LAYER][i].mean(0)[positions[i, -1] + 1 : answer]
        rows.append(probs[:, positions[i]].mean(0))
    similarity = teacher_similarity(teacher.patch_tokens, teacher.grid, (8, 8))
    target_attention = teacher_attention_map(teacher.cls_attention, teacher.grid, (8, 8))
    assert torch.allclose(terms["spatial"], spatial_alignment_loss(visual, similarity), atol=1e-6)
    expected_attention = attention_distillation_loss(torch.stack(rows), target_attention, "l2")
    assert torch.allclose(terms["attention"], expected_attention, atol=1e-6)
    assert torch.allclose(terms["lm"], out.loss, atol=1e-6)


def test_zero_lambdas_give_exactly_the_plain_lora_loss_and_gradients(tiny_student_dir, random_images):
    plain, processor = _peft_student(tiny_student_dir)
    batch = make_batch(processor, random_images, "left")
    plain_loss = plain(**batch).loss
    plain_loss.backward()
    plain_grads = {n: p.grad.clone() for n, p in plain.named_parameters() if p.requires_grad}

    model, _ = _peft_student(tiny_student_dir)
    settings = DistillSettings(layer=LAYER, lambda_align=0.0, lambda_attn=0.0, steer=SteerSettings(mode="full"))
    objective = MedAlignObjective(model, settings)
    terms = objective(batch, None)
    assert torch.equal(terms["loss"], plain_loss)
    assert terms["spatial"] == 0 and terms["attention"] == 0
    terms["loss"].backward()
    for name, grad in plain_grads.items():
        assert torch.equal(dict(model.named_parameters())[name].grad, grad), name


@pytest.mark.parametrize("steer_mode", ["off", "full", "low_rank"])
def test_only_lora_and_steer_parameters_receive_gradients(setup, steer_mode):
    model, batch, teacher = setup
    settings = DistillSettings(layer=LAYER, steer=SteerSettings(mode=steer_mode, rank=4))
    objective = MedAlignObjective(model, settings)
    objective(batch, teacher)["loss"].backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    nonzero = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable, "every trainable parameter gets a gradient, nothing else does"
    # Like LoRA's A, the low-rank steer's down-projection is still at a zero gradient while up = 0.
    assert trainable - nonzero == ({"base_model.model.medalign_steer.down"} if steer_mode == "low_rank" else set())
    assert all("lora_" in n or "medalign_steer" in n for n in trainable)
    assert any("medalign_steer" in n for n in trainable) == (steer_mode != "off")
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any("vision_tower" in n for n in frozen) and any("multi_modal_projector" in n for n in frozen)
    assert {id(p) for p in objective.trainable_parameters()} == {
        id(p) for n, p in model.named_parameters() if n in trainable
    }


def test_distillation_terms_fall_when_optimised(setup):
    """A few AdamW steps on one batch must reduce both distillation terms: the gradients point the right way."""
    model, batch, teacher = setup
    objective = MedAlignObjective(
        model, DistillSettings(layer=LAYER, lambda_align=1.0, lambda_attn=1.0, steer=SteerSettings(mode="low_rank", rank=4))
    )
    optimiser = torch.optim.AdamW(objective.trainable_parameters(), lr=5e-3, weight_decay=0.0)
    first = None
    for _ in range(15):
        terms = objective(batch, teacher)
        first = first or {k: float(v.detach()) for k, v in terms.items()}
        optimiser.zero_grad()
        terms["loss"].backward()
        optimiser.step()
    assert float(terms["spatial"]) < 0.8 * first["spatial"]
    assert float(terms["attention"]) < 0.8 * first["attention"]


def test_bad_settings_and_missing_targets_fail_clearly(setup):
    model, batch, _ = setup
    with pytest.raises(ValueError, match="lambda_align must be >= 0"):
        DistillSettings(lambda_align=-0.1)
    with pytest.raises(ValueError, match="lambda_attn must be >= 0"):
        DistillSettings(lambda_attn=float("nan"))
    with pytest.raises(ValueError, match="attention_normalize"):
        DistillSettings(attention_normalize="softmax")
    objective = MedAlignObjective(model, DistillSettings(layer=LAYER))
    with pytest.raises(ValueError, match="teacher targets are required"):
        objective(batch, None)


def test_grid_mismatch_between_teacher_and_student_is_a_shape_error(setup):
    model, batch, _ = setup
    objective = MedAlignObjective(model, DistillSettings(layer=LAYER))
    wrong = random_teacher_targets(2)  # batch of 2 targets for 3 samples
    with pytest.raises(ValueError, match=r"\(2, 64, 64\).*\(3, 64, 64\)"):
        objective(batch, wrong)
