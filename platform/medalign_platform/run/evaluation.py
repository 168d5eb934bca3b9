"""Evaluation and teacher targets for a run: data splits, greedy answers, metrics, grounding.

Evaluation generates greedy (or beam) answers for a fixed, deterministic subset of a split
and scores them with :mod:`medalign_platform.data.metrics`. The grounding score comes for free:
the distillation tap records the student's text-to-image attention at layer ``L`` during
``generate()``'s prefill, which is compared with each image's lesion mask.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..data.collate import generate_answers
from ..data.prompts import clean_question
from ..data.metrics import grounding_score, mean_grounding_score, vqa_metrics


class SplitItems:
    """A lazy, indexable view of a split's items (dicts from ``ConversationDataset``)."""

    def __init__(self, dataset, indices: list[int]):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        return self.dataset[self.indices[index]]

    def image_path(self, index: int) -> str:
        return str(self.dataset.items[self.indices[index]].image_path)

    def question(self, index: int) -> str:
        """The item's question without decoding its image."""
        return self.dataset.items[self.indices[index]].question


def load_split(data: dict, split: str) -> SplitItems:
    """Items of one split, as described by the ``data`` config section.

    ``data[split]`` is the path of a LLaVA conversation JSON file; ``data.image_root``
    (optional) is where its relative image paths start; ``data.answer_types`` (optional)
    keeps only those answer types (e.g. ``[closed, open]`` for VQA, ``[report]``).
    """
    from ..data.conversations import load_conversation_dataset

    path = data.get(split)
    if not path:
        raise ValueError(f"data.{split} is not set; point it at a LLaVA conversation JSON file")
    dataset = load_conversation_dataset(
        path, data.get("image_root"), on_error=data.get("on_error", "raise"),
        validate_images=data.get("validate_images", True),
    )
    types = data.get("answer_types")
    indices = [i for i, item in enumerate(dataset.items) if not types or item.answer_type in types]
    if not indices:
        raise ValueError(f"data.{split} ({path}) has no items of answer_types {types}")
    return SplitItems(dataset, indices)


def evaluation_items(items: SplitItems, size: int) -> list[dict]:
    """A deterministic subset of ``size`` items (all when 0), spread over the whole split."""
    if size == 0 or size >= len(items):
        return [items[i] for i in range(len(items))]
    picks = np.linspace(0, len(items) - 1, size).round().astype(int)
    return [items[int(i)] for i in picks]


TEACHER_ATTENTION = ("cls", "prompt_aware")


def teacher_attention_mode(teacher_config: dict) -> str:
    """``teacher.attention``: ``cls`` (CLS-row attention, per image) or ``prompt_aware``
    (conditioned on each question through the text tower, per image and question)."""
    mode = teacher_config.get("attention", "cls")
    if mode not in TEACHER_ATTENTION:
        raise ValueError(f"teacher.attention must be one of {list(TEACHER_ATTENTION)}, got {mode!r}")
    return mode


class TargetLookup:
    """Maps training items to their cached teacher targets.

    The teacher is loaded once per worker (its weights define the cache key); image
    content hashes are computed once per image; targets are read from the shared
    :class:`~medalign_platform.core.target_cache.TargetCache`, filled beforehand by
    :func:`precompute_targets` on the driver. With ``teacher.attention: prompt_aware`` the
    question-conditioned maps are looked up (or computed) per (image, question) too.

    Args:
        teacher_config: the ``teacher`` section (``name``, ``pretrained``, ``cache_dir``,
            ``attention``).
        teacher: an already built teacher object (any object the cache accepts, e.g. a
            SynthMed oracle); default: :func:`~medalign_platform.core.teacher.load_teacher`.
    """

    def __init__(self, teacher_config: dict, teacher=None):
        from ..core.target_cache import TargetCache
        from ..core.teacher import load_teacher

        self.mode = teacher_attention_mode(teacher_config)
        self.teacher = teacher if teacher is not None else load_teacher(teacher_config["name"],
                                                                        teacher_config.get("pretrained"))
        if self.mode == "prompt_aware" and not getattr(self.teacher, "has_text", True):
            raise ValueError(f"teacher.attention=prompt_aware but teacher {teacher_config.get('name')!r} has no text "
                             "tower; use teacher.attention=cls or convert it with its text encoder")
        self.cache = TargetCache(teacher_config["cache_dir"])
        self._hashes: dict[str, str] = {}

    def _hash(self, path) -> str:
        from ..core.target_cache import image_content_hash

        key = str(path)
        if key not in self._hashes:
            self._hashes[key] = image_content_hash(path)
        return self._hashes[key]

    def __call__(self, image_paths: Sequence[str], questions: Sequence[str] | None = None):
        """Teacher targets (``TeacherOutputs`` on CPU) for these image files, in order.

        ``questions`` (one per image) are used only in ``prompt_aware`` mode, where they are
        required; the result then carries ``prompt_attention``.
        """
        if self.mode == "prompt_aware":
            if questions is None:
                raise ValueError("teacher.attention=prompt_aware needs the question of every image")
            questions = [clean_question(q) for q in questions]
        else:
            questions = None
        return self.cache.get_or_compute(self.teacher, list(image_paths), keys=[self._hash(p) for p in image_paths],
                                         questions=questions)


def precompute_targets(teacher_config: dict, items: SplitItems, chunk: int = 2048) -> dict:
    """Fills the shared target cache for a split's images; returns the cache counters.

    Runs on the driver before any worker starts, so every run and trial that uses the
    same teacher and images only reads.
    """
    lookup = TargetLookup(teacher_config)
    if lookup.mode == "prompt_aware":  # one map per (image, question) pair
        pairs = sorted({(items.image_path(i), items.question(i)) for i in range(len(items))})
        for start in range(0, len(pairs), chunk):
            part = pairs[start : start + chunk]
            lookup([p for p, _ in part], [q for _, q in part])
        unique = sorted({p for p, _ in pairs})
    else:
        unique = sorted({items.image_path(i) for i in range(len(items))})
        for start in range(0, len(unique), chunk):
            lookup(unique[start : start + chunk])
    stats = lookup.cache.stats
    return {"images": len(unique), "hits": stats.hits, "misses": stats.misses, "corrupt": stats.corrupt}


def _prompt_attention(tap, batch_size: int) -> torch.Tensor:
    """The tap's prefill attention ``[B, N]``; beam search repeats each prompt per beam."""
    attention = tap.pop().attention.detach().float().cpu()
    return attention[:: attention.shape[0] // batch_size]


def evaluate_items(model, processor, tap, items: Sequence, *, batch_size: int = 32, max_new_tokens: int = 16,
                   num_beams: int = 1, on_predictions: Callable | None = None, prompt_template: str = "auto") -> dict:
    """Answers ``items`` greedily and scores them.

    Args:
        model: the student (peft-wrapped or not).
        processor: its processor.
        tap: the run's :class:`~medalign_platform.core.student.DistillationTap`; attention is
            captured during evaluation even when the run trains with ``lambda_attn = 0``.
        items: dataset items with ``answer`` and ``answer_type`` (and ``mask`` for grounding).
        on_predictions: optional callback ``(items, predictions, attentions)`` (e.g. TensorBoard).

    Returns:
        ``closed_accuracy``, ``open_recall``, ``open_f1``, report BLEU-4/ROUGE-L where
        present, ``grounding`` (mean over items whose image has a lesion) and counts.
    """
    capture, tap.capture_attention = tap.capture_attention, True
    attentions: list[torch.Tensor] = []
    try:
        predictions = generate_answers(
            model, processor, items, batch_size=batch_size, max_new_tokens=max_new_tokens, num_beams=num_beams,
            on_batch=lambda meta, _: attentions.append(_prompt_attention(tap, len(meta))),
            prompt_template=prompt_template,
        )
    finally:
        tap.capture_attention = capture
    attention = torch.cat(attentions)  # [n, N]
    grid = tap.grid
    scores = []
    for item, row in zip(items, attention):
        mask = item.get("mask")
        if mask is not None and mask.any():
            scores.append(float(grounding_score(row, torch.as_tensor(mask), grid)))
    records = [
        {"prediction": p, "reference": item["answer"], "answer_type": item["answer_type"]}
        for p, item in zip(predictions, items)
    ]
    metrics = {k: v for k, v in vqa_metrics(records).items() if not (isinstance(v, float) and np.isnan(v))}
    if scores:
        metrics["grounding"] = mean_grounding_score(torch.tensor(scores))
    if on_predictions is not None:
        on_predictions(items, predictions, attention)
    return metrics


def evaluate_split(model, processor, objective, settings, split: str, on_predictions: Callable | None = None) -> dict:
    """Evaluates the run's model on ``split`` (``val`` subset during training, ``test`` at the end)."""
    trainer = settings.trainer
    size = trainer.val_size if split == "val" else trainer.test_size
    items = evaluation_items(load_split(settings.data, split), size)
    return evaluate_items(
        model, processor, objective.tap, items, batch_size=trainer.eval_batch_size,
        max_new_tokens=trainer.max_new_tokens, num_beams=trainer.num_beams, on_predictions=on_predictions,
        prompt_template=settings.model.get("prompt_template", "auto"),
    )
