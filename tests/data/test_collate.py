"""The student collator: prompt format, answer-only labels, padding, truncation, generation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from medalign_platform.data.collate import (
    PROMPT_TEMPLATE,
    BatchMeta,
    StudentCollator,
    format_prompt,
    generate_answers,
)
from medalign_platform.core.student import IGNORE_INDEX, image_token_id, load_student
from medalign_platform.core.tap import find_visual_positions
from medalign_platform.synthmed.generator import SYNTHMED_WORDS
from medalign_platform.synthmed.tiny_student import tiny_student

NUM_VISUAL = 64  # 32 px / patch 4 -> 8 x 8

QA = [
    ("is there a lesion?", "yes", "closed"),
    ("where is the lesion?", "left upper quadrant", "open"),
    ("describe the findings.",
     "two lesions: a small round bright lesion in the left upper quadrant and a large elongated faint lesion "
     "in the right lower quadrant.", "report"),
    ("how many lesions are there?", "zero", "open"),
    ("in the right lower quadrant, is the lesion faint?", "no", "closed"),
]


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    path = tiny_student(tmp_path_factory.mktemp("collate_student"), words=SYNTHMED_WORDS + ["user", "assistant"])
    model, processor = load_student(path)
    return model.eval(), processor


@pytest.fixture(scope="module")
def items():
    rng = np.random.default_rng(0)
    out = []
    for i, (question, answer, kind) in enumerate(QA):
        size = (40 + 8 * i, 64 - 4 * i)   # mixed sizes: the processor resizes and crops
        image = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
        out.append({"id": f"item-{i}", "turn": 0, "image": image, "question": question, "answer": answer,
                    "answer_type": kind, "question_type": "q", "image_id": f"img-{i}"})
    return out


def _word_tokens(text: str) -> list[str]:
    """Whitespace-free comparison form of a decoded / original text."""
    return "".join(text.lower().split())


def test_prompt_template_and_format_prompt():
    assert PROMPT_TEMPLATE == "USER: <image>\n{question} ASSISTANT:"
    assert format_prompt("is there a lesion?") == "USER: <image>\nis there a lesion? ASSISTANT:"
    # A raw LLaVA question keeps one image: the template's.
    assert format_prompt("<image>\n  is there a lesion? ") == format_prompt("is there a lesion?")


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_labels_supervise_exactly_the_answer_and_eos(student, items, padding_side):
    model, processor = student
    tokenizer = processor.tokenizer
    batch, meta = StudentCollator(processor, padding_side=padding_side)(items)
    assert set(batch) == {"input_ids", "attention_mask", "pixel_values", "labels"}
    assert isinstance(meta, BatchMeta) and meta.ids == [it["id"] for it in items]
    assert meta.references == [it["answer"] for it in items]
    assert meta.answer_types == [it["answer_type"] for it in items]
    assert batch["pixel_values"].shape == (len(items), 3, 32, 32)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape
    lengths = mask.sum(1)
    assert len(set(lengths.tolist())) > 1, "the batch must mix lengths"
    for row, item in enumerate(items):
        real = mask[row].bool()
        # Padding: all on one side, pad token, never supervised.
        pad = int((~real).sum())
        expected_real = torch.zeros_like(real)
        if padding_side == "left":
            expected_real[pad:] = True
        else:
            expected_real[: len(real) - pad] = True
        assert torch.equal(real, expected_real)
        assert torch.all(ids[row][~real] == tokenizer.pad_token_id)
        assert torch.all(labels[row][~real] == IGNORE_INDEX)
        # The prompt is exactly what the processor makes of it, and unsupervised.
        start = pad if padding_side == "left" else 0
        n_prompt = meta.prompt_lengths[row]
        prompt = processor(images=item["image"], text=format_prompt(item["question"]), return_tensors="pt")
        assert torch.equal(ids[row, start:start + n_prompt], prompt["input_ids"][0])
        assert torch.all(labels[row, start:start + n_prompt] == IGNORE_INDEX)
        # Everything after the prompt is supervised with its own token: the answer, then EOS.
        answer = labels[row, start + n_prompt:start + int(lengths[row])]
        assert torch.all(answer != IGNORE_INDEX)
        assert torch.equal(answer, ids[row, start + n_prompt:start + int(lengths[row])])
        assert int(answer[-1]) == tokenizer.eos_token_id
        assert _word_tokens(tokenizer.decode(answer[:-1])) == _word_tokens(item["answer"])
        assert int((labels[row] != IGNORE_INDEX).sum()) == len(answer)
        assert tokenizer.unk_token_id not in ids[row].tolist()
    assert meta.truncated == [False] * len(items)
    # The loss is defined and padding side does not change it (RoPE is relative).
    with torch.no_grad():
        loss = model(**batch).loss
        other, _ = StudentCollator(processor, padding_side="right" if padding_side == "left" else "left")(items)
        assert torch.isfinite(loss)
        assert torch.allclose(loss, model(**other).loss, atol=1e-4)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_image_span_intact_and_before_the_answer(student, items, padding_side):
    model, processor = student
    batch, meta = StudentCollator(processor, padding_side=padding_side)(items)
    positions = find_visual_positions(batch["input_ids"], image_token_id(model), NUM_VISUAL)
    assert positions.shape == (len(items), NUM_VISUAL)
    pad = (batch["attention_mask"] == 0).sum(1)
    offset = pad if padding_side == "left" else torch.zeros_like(pad)
    assert torch.equal(positions[:, 0], offset + 3)   # "<s> user :" then the image
    first_answer = (batch["labels"] != IGNORE_INDEX).int().argmax(1)
    assert torch.all(positions[:, -1] < first_answer)


def test_prompts_only_for_generation(student, items):
    _, processor = student
    collator = StudentCollator(processor, with_answers=False)
    assert collator.padding_side == "left"
    batch, meta = collator(items)
    assert "labels" not in batch
    tail = processor.tokenizer.convert_tokens_to_ids(["assistant", ":"])
    assert batch["input_ids"][:, -2:].tolist() == [tail] * len(items)   # left padding: prompts end together
    assert meta.prompt_lengths == batch["attention_mask"].sum(1).tolist()
    # Items without answers are fine without labels; with answers they are required.
    bare = [{k: v for k, v in it.items() if k != "answer"} for it in items]
    collator(bare)
    with pytest.raises(KeyError, match="item-0"):
        StudentCollator(processor)(bare)
    right, _ = StudentCollator(processor, with_answers=False, padding_side="right")(items)
    assert right["attention_mask"][:, 0].all()


def test_too_long_prompt_names_the_sample_and_the_fix(student, items):
    _, processor = student
    n_prompt = StudentCollator(processor)(items[:1])[1].prompt_lengths[0]
    with pytest.raises(ValueError, match=r"sample 'item-0'.*64 image tokens.*raise max_length") as info:
        StudentCollator(processor, max_length=n_prompt)(items[:1])   # no room for one answer token
    assert "never truncated" in str(info.value)
    with pytest.raises(ValueError, match="item-0"):
        StudentCollator(processor, max_length=NUM_VISUAL, with_answers=False)(items[:1])
    StudentCollator(processor, max_length=n_prompt, with_answers=False)(items[:1])   # fits exactly
    with pytest.raises(ValueError, match="padding_side"):
        StudentCollator(processor, padding_side="middle")


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_only_the_answer_is_truncated(student, items, padding_side):
    model, processor = student
    tokenizer = processor.tokenizer
    report = items[2]
    prompt_lengths = StudentCollator(processor)(items)[1].prompt_lengths
    max_length = max(prompt_lengths) + 2
    keep = max_length - prompt_lengths[2]   # the report keeps this many answer tokens
    batch, meta = StudentCollator(processor, max_length=max_length, padding_side=padding_side)(items)
    assert batch["input_ids"].shape[1] == max_length
    assert meta.truncated[2] and not meta.truncated[0]
    labels = batch["labels"][2]
    supervised = labels[labels != IGNORE_INDEX]
    expected = tokenizer(report["answer"], add_special_tokens=False)["input_ids"][:keep]
    assert len(expected) == keep < len(tokenizer(report["answer"], add_special_tokens=False)["input_ids"])
    assert supervised.tolist() == expected   # the answer's first tokens, no EOS
    # Short answers keep their EOS; every image span is complete.
    first = batch["labels"][0]
    assert int(first[first != IGNORE_INDEX][-1]) == tokenizer.eos_token_id
    find_visual_positions(batch["input_ids"], image_token_id(model), NUM_VISUAL)


def test_generate_answers_is_greedy_ordered_and_batch_independent(student, items):
    model, processor = student
    model.train()
    one = generate_answers(model, processor, items, max_new_tokens=4, batch_size=1)
    assert model.training, "generate_answers must restore the training mode"
    model.eval()
    many = generate_answers(model, processor, items, max_new_tokens=4, batch_size=3)
    assert len(one) == len(items) and all(isinstance(a, str) for a in one)
    assert one == many   # left padding does not change what a sample generates
    assert all(a == a.strip() and "<pad>" not in a and "</s>" not in a for a in one)
    # Greedy: the first generated word is the argmax of the prompt's last logits.
    batch, _ = StudentCollator(processor, with_answers=False)(items[:1])
    with torch.no_grad():
        first = int(model(**batch).logits[0, -1].argmax())
    expected = processor.tokenizer.decode([first], skip_special_tokens=True).strip()
    # (startswith: punctuation and digit tokens decode without a space between them)
    assert one[0].startswith(expected) or (not expected and one[0] == "")


class _CountingImages:
    """Wraps a processor's image processor and counts the images it processes."""

    def __init__(self, inner):
        self.inner, self.images = inner, 0

    def __call__(self, images, *args, **kwargs):
        self.images += len(images)
        return self.inner(images, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_training_batches_process_each_image_once_with_the_same_ids(student, items, monkeypatch):
    """The answers' pass reuses the prompts' processed images (the processor's own
    ``replace_image_token`` expansion, then the tokenizer alone), and a processor whose
    expansion cannot be reproduced goes through the processor again: same batch both ways."""
    _, processor = student
    counting = _CountingImages(processor.image_processor)
    monkeypatch.setattr(processor, "image_processor", counting)
    once, meta = StudentCollator(processor)(items)
    assert counting.images == len(items)

    # The fallbacks: no usable replacement hook, or one whose expansion does not reproduce the
    # processor's prompt ids: both passes then run the full processor.
    for replacements in (lambda encoded, count: None,
                         lambda encoded, count: [processor.image_token * 3] * count):
        monkeypatch.setattr(StudentCollator, "_image_replacements", staticmethod(replacements))
        counting.images = len(items)
        twice, meta_twice = StudentCollator(processor)(items)
        assert counting.images == 3 * len(items)
        assert once.keys() == twice.keys() and vars(meta) == vars(meta_twice)
        for key in once:
            assert torch.equal(once[key], twice[key]), key
