"""Dataset items -> student batches: the one prompt format and collator for training and evaluation.

Every (image, question, answer) item becomes one single-turn conversation in the student's
prompt format (:mod:`medalign_platform.data.prompts`, ``model.prompt_template``): by default
the processor's own chat template, else the LLaVA-1.5 format::

    USER: <image>\\n{question} ASSISTANT: {answer}</s>

The prompt is the rendered user turn with the generation prompt (everything up to and
including ``"ASSISTANT:"`` here, ``[/INST]`` for LLaVA-Med's Mistral format, ``assistant\\n``
for ChatML); the answer follows after one space (directly after a trailing newline) and ends
with the tokenizer's EOS token. The processor expands ``<image>`` into the student's
``N = H*W`` image tokens. Only the answer and its EOS are supervised: labels are ``-100``
(:data:`~medalign_platform.core.student.IGNORE_INDEX`) on the prompt and on padding, so the
answer starts at the first label that is not ``-100`` -- the convention
:func:`medalign_platform.core.tap.text_query_mask` relies on.

API::

    collator = StudentCollator(processor, max_length=256)          # training: right padding, labels
    batch, meta = collator(items)
    loss = model(**batch).loss                                    # batch holds tensors only

    prompts = StudentCollator(processor, with_answers=False)      # generation: left padding, no labels
    answers = generate_answers(model, processor, items)           # greedy, stripped strings

``batch`` is a plain dict of tensors (``input_ids``, ``attention_mask``, ``pixel_values``
and, with answers, ``labels``) that goes straight into ``model(**batch)`` or
``model.generate(**batch)``; ``meta`` is a :class:`BatchMeta` with the per-sample ids,
references, answer types, masks ... in batch order, for evaluation. With a
``torch.utils.data.DataLoader(dataset, collate_fn=collator)`` each step yields that
``(batch, meta)`` pair.

Items are the dicts of :class:`medalign_platform.data.conversations.ConversationDataset` (``image`` a PIL
image, ``question`` without ``<image>``, ``answer``, ``answer_type``, ``id`` ...); any mapping
with at least ``image`` and ``question`` (and ``answer`` when answers are wanted) works.

Truncation never cuts the prompt (and so never the image span): a prompt longer than
``max_length`` (or, with answers, one that leaves no room for a single answer token) is an
error naming the sample; only the answer's tail (and then its EOS) is cut.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..common.errors import image_read_error
from ..core.student import IGNORE_INDEX
from .prompts import answer_separator, check_template, clean_question, render_prompt

__all__ = [
    "IMAGE_PLACEHOLDER",
    "PROMPT_TEMPLATE",
    "BatchMeta",
    "StudentCollator",
    "format_prompt",
    "generate_answers",
    "item_key",
]

#: The image placeholder the LLaVA processor expands into the student's image tokens.
IMAGE_PLACEHOLDER = "<image>"

#: The LLaVA-1.5 ("vicuna_v1"-style, no system prompt) single-turn prompt every student sees,
#: in training and evaluation alike. The image always comes first, then a newline and the
#: question; the model's answer follows ``"ASSISTANT:"`` after one space and ends with EOS.
PROMPT_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"


def format_prompt(question: str) -> str:
    """The prompt for one question: :data:`PROMPT_TEMPLATE` filled in.

    Any ``<image>`` left in ``question`` (a raw LLaVA ``"<image>\\n..."`` value) is removed,
    since the template places the one image itself; surrounding whitespace is stripped.
    """
    return PROMPT_TEMPLATE.format(question=clean_question(question))


def item_key(item: Mapping[str, Any], index: int | None = None) -> str:
    """A per-item id: the record ``id`` (``"<id>#<turn>"`` for later turns of a multi-turn record)."""
    rid = item.get("id")
    if rid is None:
        return f"#{index}" if index is not None else "<no id>"
    turn = item.get("turn")
    return f"{rid}#{turn}" if isinstance(turn, int) and turn > 0 else str(rid)


@dataclass
class BatchMeta:
    """Per-sample information that is not a model input, in batch order.

    ``references`` are the items' answers (``None`` where an item has none);
    ``prompt_lengths`` count the prompt's tokens (BOS and the image tokens included, padding
    excluded); ``truncated`` marks samples whose answer was cut to fit ``max_length``.
    """

    ids: list[str]
    questions: list[str]
    references: list[str | None]
    answer_types: list[str | None]
    question_types: list[str | None] = field(default_factory=list)
    image_ids: list[str | None] = field(default_factory=list)
    masks: list[np.ndarray | None] = field(default_factory=list)
    prompt_lengths: list[int] = field(default_factory=list)
    truncated: list[bool] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


def _as_image(item: Mapping[str, Any], key: str) -> Image.Image:
    image = item.get("image")
    if image is None and item.get("image_path") is not None:
        try:
            with Image.open(item["image_path"]) as im:
                return im.convert("RGB")
        except (OSError, SyntaxError, ValueError) as error:  # truncated or not an image
            raise image_read_error(item["image_path"], error) from error
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, np.ndarray):
        return Image.fromarray(image).convert("RGB")
    raise TypeError(f"sample {key!r}: 'image' must be a PIL image or a uint8 array, got {type(image).__name__}")


def _ids_list(values) -> list[list[int]]:
    return [list(map(int, ids.tolist() if hasattr(ids, "tolist") else ids)) for ids in values]


class StudentCollator:
    """Turns dataset items into one padded student batch (see the module docstring).

    Args:
        processor: the student's ``LlavaProcessor`` (tokenizer + image processor).
        max_length: most tokens per sample, image tokens included. Only answers are truncated;
            a prompt that does not fit raises ``ValueError`` naming the sample.
        padding_side: ``"right"`` or ``"left"``; ``None`` (default) is right padding with
            answers (training) and left padding without (generation, which needs it).
        with_answers: append ``" {answer}" + EOS`` and return ``labels`` that supervise exactly
            those tokens; ``False`` gives prompts only (no ``labels``), ready for ``generate``.
        prompt_template: ``auto`` (the processor's chat template, else LLaVA-1.5), a named
            format (``llava_v1``, ``mistral_instruct``, ``qwen_chatml``) or a format string
            with ``{question}``; see :mod:`medalign_platform.data.prompts`.

    Calling the collator returns ``(batch, meta)``: ``batch`` a dict of tensors
    ``input_ids [B, T]``, ``attention_mask [B, T]``, ``pixel_values [B, 3, S, S]`` and (with
    answers) ``labels [B, T]``; ``meta`` a :class:`BatchMeta`. ``T`` is the longest sample of
    the batch (``<= max_length``).
    """

    def __init__(
        self,
        processor,
        *,
        max_length: int = 256,
        padding_side: str | None = None,
        with_answers: bool = True,
        prompt_template: str | None = "auto",
    ):
        self.prompt_template = check_template(prompt_template)
        if padding_side is None:
            padding_side = "right" if with_answers else "left"
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is None:
            raise TypeError("processor has no tokenizer; pass the student's LlavaProcessor (from load_student)")
        self.processor = processor
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.padding_side = padding_side
        self.with_answers = with_answers
        self.eos_token_id = tokenizer.eos_token_id
        if with_answers and self.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token; answers must end with EOS for the student to stop")
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else self.eos_token_id)
        image_token_id = getattr(processor, "image_token_id", None)
        if image_token_id is None:
            image_token_id = tokenizer.convert_tokens_to_ids(getattr(processor, "image_token", IMAGE_PLACEHOLDER))
        self.image_token_id = int(image_token_id)

    # ------------------------------------------------------------------ encoding

    def _encode(self, images: list[Image.Image], texts: list[str]) -> tuple[list[list[int]], torch.Tensor, Any]:
        encoded = self.processor(images=images, text=texts, padding=False)
        pixel_values = encoded["pixel_values"]
        if isinstance(pixel_values, torch.Tensor):
            pixels = pixel_values
        else:
            pixels = torch.stack([torch.as_tensor(np.asarray(p)) for p in pixel_values])
        return _ids_list(encoded["input_ids"]), pixels.to(torch.float32), encoded

    def _encode_again(self, encoded, images: list[Image.Image], prompts: list[str], prompt_ids: list[list[int]],
                      texts: list[str]) -> list[list[int]]:
        """Token ids of ``texts`` (the prompts + answers) for images the processor has already seen.

        Image processing is most of a processor call (and all of it is repeated by a second
        call), so the answers' pass expands the image placeholder with the processor's own
        replacement for each processed image (``replace_image_token``, transformers' hook for
        that) and runs the tokenizer alone. The same expansion of the prompts must give the
        processor's prompt ids exactly, else (a processor that does more than this to the
        text) the texts go through the processor again, images included.
        """
        image_token = getattr(self.processor, "image_token", IMAGE_PLACEHOLDER)
        replacements = self._image_replacements(encoded, len(images))
        if replacements is not None and all(text.count(image_token) == 1 for text in (*prompts, *texts)):
            def expand(batch: list[str]) -> list[list[int]]:
                expanded = [text.replace(image_token, r) for text, r in zip(batch, replacements)]
                return _ids_list(self.tokenizer(expanded, padding=False)["input_ids"])

            if expand(prompts) == prompt_ids:
                return expand(texts)
        return self._encode(images, texts)[0]

    def _image_replacements(self, encoded, count: int) -> list[str] | None:
        """The processor's text for each of ``count`` processed images, or None if it has no such hook."""
        try:
            return [self.processor.replace_image_token(encoded, image_idx=i) for i in range(count)]
        except (AttributeError, NotImplementedError, KeyError, IndexError, TypeError):
            return None

    def _strip_auto_eos(self, ids: list[int]) -> list[int]:
        # Tokenizers set to append EOS themselves (add_eos_token=True) would put one after the
        # prompt too; the collator adds the answer's EOS itself.
        return ids[:-1] if ids and self.eos_token_id is not None and ids[-1] == self.eos_token_id else ids

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> tuple[dict[str, torch.Tensor], BatchMeta]:
        items = list(items)
        if not items:
            raise ValueError("StudentCollator got an empty list of items")
        keys = [item_key(item, i) for i, item in enumerate(items)]
        for key, item in zip(keys, items):
            if "question" not in item:
                raise KeyError(f"sample {key!r} has no 'question'")
            if self.with_answers and not isinstance(item.get("answer"), str):
                raise KeyError(f"sample {key!r} has no 'answer' string; use with_answers=False for prompts only")
        images = [_as_image(item, key) for key, item in zip(keys, items)]
        prompts = [render_prompt(item["question"], self.processor, self.prompt_template) for item in items]
        prompt_ids, pixel_values, encoded = self._encode(images, prompts)
        raw_prompt_ids = prompt_ids
        prompt_ids = [self._strip_auto_eos(ids) for ids in prompt_ids]
        for key, ids in zip(keys, prompt_ids):
            if self.image_token_id not in ids:
                raise ValueError(f"sample {key!r}: the processor did not insert image tokens (id "
                                 f"{self.image_token_id}) into the prompt; use the student's own LlavaProcessor")
        if self.with_answers:
            answers = [" ".join(item["answer"].split()) for item in items]
            full_ids = self._encode_again(encoded, images, prompts, raw_prompt_ids,
                                          [f"{p}{answer_separator(p)}{a}" for p, a in zip(prompts, answers)])
            full_ids = [self._strip_auto_eos(ids) + [int(self.eos_token_id)] for ids in full_ids]
        else:
            full_ids = prompt_ids

        sequences, label_rows, truncated = [], [], []
        limit = self.max_length
        for key, prompt, full, prompt_text in zip(keys, prompt_ids, full_ids, prompts):
            prompt_text_end = prompt_text[-20:]
            n_prompt = len(prompt)
            n_image = prompt.count(self.image_token_id)
            needed = n_prompt + 1 if self.with_answers else n_prompt
            if needed > limit:
                room = " and at least one answer token" if self.with_answers else ""
                raise ValueError(
                    f"sample {key!r}: its prompt is {n_prompt} tokens ({n_image} image tokens + "
                    f"{n_prompt - n_image} text tokens), so max_length={limit} cannot hold the prompt{room}. "
                    f"Prompts (and their image span) are never truncated: raise max_length to at least {needed} "
                    f"(e.g. {needed + 32}) or shorten the question."
                )
            if full[:n_prompt] != prompt:
                raise ValueError(
                    f"sample {key!r}: the tokenized prompt is not a prefix of prompt + answer, so the answer's "
                    "first token cannot be located; the tokenizer merges text across the prompt / answer "
                    f"boundary (prompt ends {prompt_text_end!r}). Use a prompt template that ends on a token boundary "
                    "(model.prompt_template) or a tokenizer that splits on the space before the answer."
                )
            truncated.append(len(full) > limit)
            ids = full[:limit]
            sequences.append(ids)
            if self.with_answers:
                label_rows.append([IGNORE_INDEX] * n_prompt + ids[n_prompt:])

        width = max(len(ids) for ids in sequences)
        batch_size = len(sequences)
        input_ids = torch.full((batch_size, width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, width), dtype=torch.long)
        labels = torch.full((batch_size, width), IGNORE_INDEX, dtype=torch.long) if self.with_answers else None
        for row, ids in enumerate(sequences):
            span = slice(width - len(ids), width) if self.padding_side == "left" else slice(0, len(ids))
            input_ids[row, span] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, span] = 1
            if labels is not None:
                labels[row, span] = torch.tensor(label_rows[row], dtype=torch.long)

        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}
        if labels is not None:
            batch["labels"] = labels
        meta = BatchMeta(
            ids=keys,
            questions=[item["question"] for item in items],
            references=[item.get("answer") for item in items],
            answer_types=[item.get("answer_type") for item in items],
            question_types=[item.get("question_type") for item in items],
            image_ids=[item.get("image_id") for item in items],
            masks=[item.get("mask") for item in items],
            prompt_lengths=[len(ids) for ids in prompt_ids],
            truncated=truncated,
        )
        return batch, meta


@torch.no_grad()
def generate_answers(
    model,
    processor,
    items: Sequence[Mapping[str, Any]],
    *,
    max_new_tokens: int = 16,
    batch_size: int = 16,
    max_length: int = 1024,
    num_beams: int = 1,
    on_batch: Callable[[BatchMeta, list[str]], None] | None = None,
    prompt_template: str | None = "auto",
) -> list[str]:
    """Greedy answers of ``model`` to ``items``' questions, in item order.

    Prompts are built with :class:`StudentCollator` (``with_answers=False``, left padding),
    decoded greedily for at most ``max_new_tokens`` tokens (stopping at EOS), and returned
    without special tokens and surrounding whitespace. The model is put in eval mode for the
    call and its training mode restored afterwards.

    Args:
        model: the (optionally peft-wrapped) LLaVA-family student.
        processor: its processor.
        items: dataset items (a list or a ``ConversationDataset``).
        max_length: most prompt tokens (see :class:`StudentCollator`).
        num_beams: beam search width (1 = greedy).
        prompt_template: the prompt format (see :class:`StudentCollator`).
        on_batch: called with ``(meta, answers)`` after each ``generate()`` call, e.g. to
            read what a :class:`~medalign_platform.core.tap.DistillationTap` captured on the
            prompt during that call's prefill.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    collator = StudentCollator(processor, max_length=max_length, padding_side="left", with_answers=False,
                               prompt_template=prompt_template)
    parameter = next(model.parameters())
    device = parameter.device
    float_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    tokenizer = collator.tokenizer
    was_training = model.training
    model.eval()
    answers: list[str] = []
    try:
        for start in range(0, len(items), batch_size):
            chunk = [items[i] for i in range(start, min(start + batch_size, len(items)))]
            batch, meta = collator(chunk)
            batch = {k: v.to(device) for k, v in batch.items()}
            batch["pixel_values"] = batch["pixel_values"].to(float_dtype)
            output = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=num_beams,
                pad_token_id=collator.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new_tokens = output[:, batch["input_ids"].shape[1]:]
            decoded = [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
            answers.extend(decoded)
            if on_batch is not None:
                on_batch(meta, decoded)
    finally:
        model.train(was_training)
    return answers
