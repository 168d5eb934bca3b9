"""trainer.gradient_checkpointing: the recomputed decoder gives the same MedAlign loss and
gradients (the tap's hook on block L runs again in the recomputation, steer included)."""

from __future__ import annotations

import torch
from conftest import make_batch, random_teacher_targets

from medalign_platform.core.objective import DistillSettings, MedAlignObjective
from medalign_platform.core.student import LoraSettings, SteerSettings, apply_lora, enable_gradient_checkpointing
from medalign_platform.core.student import load_student


def _loss_and_grads(tiny_student_dir, random_images, checkpointing: bool):
    model, processor = load_student(tiny_student_dir)
    torch.manual_seed(0)
    model = apply_lora(model, LoraSettings(rank=4, alpha=8, dropout=0.0))
    objective = MedAlignObjective(model, DistillSettings(layer=2, lambda_align=1.0, lambda_attn=0.5,
                                                         steer=SteerSettings(mode="low_rank", rank=4)))
    for name, param in model.named_parameters():
        if "lora_B" in name or "medalign_steer.up" in name:  # non-zero, so every path carries gradient
            param.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    if checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    terms = objective(make_batch(processor, random_images, "right"), random_teacher_targets(3))
    terms["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return terms, grads, model


def test_checkpointed_step_equals_the_plain_step(tiny_student_dir, random_images):
    plain_terms, plain_grads, _ = _loss_and_grads(tiny_student_dir, random_images, False)
    terms, grads, model = _loss_and_grads(tiny_student_dir, random_images, True)
    assert model.get_base_model().model.language_model.gradient_checkpointing
    for key in ("loss", "lm", "spatial", "attention"):
        assert torch.allclose(terms[key], plain_terms[key], atol=1e-6), key
    assert grads.keys() == plain_grads.keys() and any("medalign_steer" in n for n in grads)
    for name in grads:
        assert torch.allclose(grads[name], plain_grads[name], atol=1e-6, rtol=1e-5), name
