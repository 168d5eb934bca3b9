"""The collator and the distillation tap on every supported LLM family (tiny random models).

Llama (llava-1.5 / Vicuna template), Mistral with a sliding window that cuts into the image
span (LLaVA-Med's instruction template) and Qwen2 with a sliding last layer and biased q/k/v
(llava-interleave's ChatML, SigLIP without CLS). For each: the chat template shapes the
prompt, labels supervise exactly answer + EOS, and the tap's recomputed text-to-image
attention equals eager ``output_attentions`` (padding, sliding masks and all).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from real_formats import tiny_family_student

from medalign_platform.core.student import image_token_id, load_student
from medalign_platform.core.tap import DistillationTap, find_visual_positions
from medalign_platform.core.tap import text_query_mask
from medalign_platform.data.collate import StudentCollator
from medalign_platform.data.prompts import render_prompt

FAMILIES = ["llama", "mistral", "qwen2"]
WINDOW = 24
ITEMS = [
    {"id": "a", "question": "is there a lesion ?", "answer": "yes"},
    {"id": "b", "question": "where is the lesion in this image ?", "answer": "left upper lung"},
    {"id": "c", "question": "<image>\nwhat organ is shown ?", "answer": "the liver"},
]
PROMPT_STARTS = {"llama": "USER: <image>\n", "mistral": "[INST] <image>\n", "qwen2": "<|im_start|>user <image>\n"}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    path = tiny_family_student(tmp_path_factory.mktemp(request.param), request.param, sliding_window=WINDOW)
    return request.param, path


@pytest.fixture(scope="module")
def items():
    rng = np.random.default_rng(0)
    return [{**item, "image": Image.fromarray(rng.integers(0, 256, (30, 44, 3), dtype=np.uint8))} for item in ITEMS]


def test_chat_template_prompts_and_answer_only_labels(family, items):
    name, path = family
    _, processor = load_student(path)
    tokenizer = processor.tokenizer
    collator = StudentCollator(processor, max_length=256)
    batch, meta = collator(items)
    for row, item in enumerate(items):
        prompt = render_prompt(item["question"], processor)
        assert prompt.startswith(PROMPT_STARTS[name]) and "<image>" not in prompt[len(PROMPT_STARTS[name]):]
        supervised = batch["labels"][row][batch["labels"][row] != -100].tolist()
        assert supervised[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(supervised[:-1]).strip() == item["answer"]
        assert meta.prompt_lengths[row] == int((batch["labels"][row] == -100)[batch["attention_mask"][row] == 1].sum())


@pytest.mark.parametrize("padding_side, with_answers", [("right", True), ("left", False)])
def test_tap_attention_matches_eager_on_every_family(family, items, padding_side, with_answers):
    name, path = family
    model, processor = load_student(path, attn_implementation="eager")
    model.eval()
    batch, _ = StudentCollator(processor, max_length=256, padding_side=padding_side, with_answers=with_answers)(items)
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    positions = find_visual_positions(batch["input_ids"], image_token_id(model), grid * grid)
    queries = text_query_mask(positions, batch["attention_mask"], batch.get("labels"), batch["input_ids"].shape[1])
    for layer in (1, 2):
        tap = DistillationTap(model, layer)
        with torch.no_grad():
            out = model(**batch, output_attentions=True, output_hidden_states=True)
        captured = tap.pop()
        tap.remove()
        probs = out.attentions[layer].mean(dim=1)
        reference = torch.stack([probs[i][queries[i]][:, positions[i]].mean(0) for i in range(len(items))])
        assert (captured.attention - reference).abs().max() <= 1e-5, (name, layer)
        visual = out.hidden_states[layer].gather(1, positions[:, :, None].expand(-1, -1, out.hidden_states[layer].shape[-1]))
        assert torch.equal(captured.visual_states, visual)
    sliding_last = name in ("mistral", "qwen2")
    if sliding_last:  # the window really cuts the image span: the last prompt token cannot see the first image token
        last_query = int(queries[0].nonzero().max())
        assert last_query - int(positions[0, 0]) >= WINDOW
        assert float(out.attentions[2][0, :, last_query, positions[0, 0]].max()) == 0.0


def test_generation_prompt_of_every_family_runs_through_the_tap(family, items):
    from medalign_platform.data.collate import generate_answers

    _, path = family
    model, processor = load_student(path)
    tap = DistillationTap(model, 1)
    seen = []
    answers = generate_answers(model, processor, items, max_new_tokens=3, batch_size=2,
                               on_batch=lambda meta, _: seen.append(tap.pop().attention.shape))
    assert len(answers) == 3 and seen[0][0] == 2 and seen[-1][0] == 1


def test_auto_template_of_the_synthmed_student_is_the_legacy_llava_prompt(tiny_student_dir):
    """The embedded default keeps its exact prompt: the tiny student's chat template renders
    what format_prompt (LLaVA-1.5, no system prompt) always produced."""
    from medalign_platform.data.collate import format_prompt

    _, processor = load_student(tiny_student_dir)
    for question in ("is there a lesion ?", "<image>\n  where   is the mass ?"):
        assert render_prompt(question, processor) == format_prompt(question) == render_prompt(
            question, processor, "llava_v1")
