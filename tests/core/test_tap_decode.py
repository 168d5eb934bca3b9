"""A decode step that emits the image token id leaves the tap's prefill capture alone."""

from __future__ import annotations

import torch
from conftest import make_batch
from transformers import LogitsProcessor, LogitsProcessorList

from medalign_platform.core.student import image_token_id, load_student
from medalign_platform.core.tap import DistillationTap


class _ForceToken(LogitsProcessor):
    def __init__(self, token_id: int):
        self.token_id = token_id

    def __call__(self, input_ids, scores):
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.token_id] = 0.0
        return forced


def test_generated_image_token_does_not_break_the_tap(tiny_student_dir, random_images):
    # An untrained student can answer with the <image> id (it happened on the VQA-RAD
    # end-to-end run); the decode step then holds 1 image token, not a whole image.
    model, processor = load_student(tiny_student_dir)
    model.eval()
    batch = make_batch(processor, random_images[:2], "left", with_answers=False)
    tap = DistillationTap(model, 2)
    token = image_token_id(model)
    with torch.no_grad():
        tokens = model.generate(**batch, max_new_tokens=3, do_sample=False,
                                logits_processor=LogitsProcessorList([_ForceToken(token)]))
    assert (tokens[:, -3:] == token).all()
    prefill = tap.pop()
    with torch.no_grad():
        model(**batch)
    assert torch.allclose(prefill.attention, tap.pop().attention, atol=1e-6)
    tap.remove()
