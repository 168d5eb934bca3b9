"""The answer-position grounding read: exact attention rows, scoring, and evaluation keys."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_batch

from medalign_platform.core.student import image_token_id, load_student
from medalign_platform.core.tap import DistillationTap, find_visual_positions
from medalign_platform.data.metrics import pointing_hit
from medalign_platform.run.grounding import AnswerAttentionTap, answer_grounding

NUM_VISUAL = 64  # tiny student: 32 px / patch 4 -> 8 x 8


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_answer_rows_equal_eager_attention_of_the_last_prompt_token(tiny_student_dir, random_images, padding_side):
    model, processor = load_student(tiny_student_dir, attn_implementation="eager")
    model.eval()
    batch = make_batch(processor, random_images, padding_side=padding_side, with_answers=False)
    tap = AnswerAttentionTap(model)
    with torch.no_grad():
        out = model(**batch, output_attentions=True)
    rows = tap.pop()  # [B, layers, heads, N]
    tap.remove()
    positions = find_visual_positions(batch["input_ids"], image_token_id(model), NUM_VISUAL)
    last = [int(batch["attention_mask"][i].nonzero().max()) for i in range(len(random_images))]
    assert rows.shape == (len(random_images), len(out.attentions), out.attentions[0].shape[1], NUM_VISUAL)
    for layer, probs in enumerate(out.attentions):  # [B, heads, T, T]
        for i in range(len(random_images)):
            expected = probs[i, :, last[i], positions[i]]
            torch.testing.assert_close(rows[i, layer], expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("layer", [1, 2])
def test_the_answer_read_leaves_the_distillation_tap_capture_alone(tiny_student_dir, random_images, layer):
    # Both hook the same block; the answer read's own q/k projections must not be taken for
    # the block's (the distillation tap hooks the projection modules' calls).
    model, processor = load_student(tiny_student_dir)
    batch = make_batch(processor, random_images)
    distill = DistillationTap(model, layer)
    with torch.no_grad():
        model(**batch)
    alone = distill.pop()
    answer = AnswerAttentionTap(model)
    with torch.no_grad():
        model(**batch)
    both = distill.pop()
    rows = answer.pop()
    answer.remove()
    distill.remove()
    assert alone.attention is not None and both.attention is not None
    torch.testing.assert_close(both.attention, alone.attention)
    torch.testing.assert_close(both.visual_states, alone.visual_states)
    assert rows.shape[0] == len(random_images) and torch.isfinite(rows).all()


def _prefilled(tiny_student_dir, random_images):
    """A student, a two-image prompt batch, its answer tap, and a copy of the prompt's capture."""
    model, processor = load_student(tiny_student_dir)
    batch = make_batch(processor, random_images[:2], with_answers=False)
    tap = AnswerAttentionTap(model)
    with torch.no_grad():
        model(**batch)
    return model, batch, tap, torch.stack([r.clone() for r in tap._rows], 1)


def test_tap_keeps_the_prefill_capture_through_decoding(tiny_student_dir, random_images):
    model, batch, tap, first = _prefilled(tiny_student_dir, random_images)
    with torch.no_grad():
        model.generate(**batch, max_new_tokens=3, do_sample=False)
    rows = tap.pop()
    tap.remove()
    assert rows.shape[0] == 2 and torch.isfinite(rows).all()
    assert torch.allclose(rows, first, atol=1e-5)   # decoding steps leave it alone
    with pytest.raises(RuntimeError, match="captured nothing"):
        tap.pop()


def test_a_decode_step_that_emits_the_image_token_keeps_the_prefill_capture(tiny_student_dir, random_images):
    # An untrained student can answer with the <image> id; that one-token step is not an image.
    model, _, tap, first = _prefilled(tiny_student_dir, random_images)
    with torch.no_grad():
        step = torch.tensor([[image_token_id(model)], [1]])
        model(input_ids=step, attention_mask=torch.ones_like(step))
    rows = tap.pop()
    tap.remove()
    assert torch.allclose(rows, first, atol=1e-5)


def test_pointing_hit_and_answer_grounding_values():
    grid = (2, 2)
    mask = torch.zeros(3, 4, 4, dtype=torch.bool)
    mask[0, :2, :2] = True            # cell 0
    mask[1, 2:, 2:] = True            # cell 3
    attention = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]])
    hits = pointing_hit(attention, mask, grid)
    assert hits[:2].tolist() == [1.0, 0.0] and torch.isnan(hits[2])
    # answer_grounding: [n, layers, heads, N]; layer 0 points at the mask, layer 1 is uniform.
    rows = torch.stack([attention[:2], torch.full((2, 4), 0.25)], dim=1)[:, :, None, :].repeat(1, 1, 2, 1)
    scores = answer_grounding(rows, [mask[0].numpy(), mask[1].numpy(), None], grid, detail=True)
    assert scores["grounding_answer_l0"] == pytest.approx((0.7 * 4 + 0.1 * 4) / 2)
    assert scores["grounding_answer_l1"] == pytest.approx(1.0)
    assert scores["grounding_answer_l0h1"] == pytest.approx(scores["grounding_answer_l0"])
    assert scores["grounding_answer"] == pytest.approx(((0.475 * 4) + (0.175 * 4)) / 2)
    assert scores["pointing_answer"] == pytest.approx(0.5)
    assert answer_grounding(rows, [None, np.zeros((4, 4), bool)], grid) == {}
