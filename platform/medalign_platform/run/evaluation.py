"""Evaluation and teacher targets for a run: data splits, greedy answers, metrics, grounding.

Evaluation generates greedy (or beam) answers for a fixed, deterministic subset of a split
and scores them with :mod:`medalign_platform.data.metrics`. The grounding score comes for free:
the distillation tap records the student's text-to-image attention at layer ``L`` during
``generate()``'s prefill, which is compared with each image's lesion mask.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from ..data.collate import generate_answers
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


def build_teacher(teacher_config: dict):
    """The teacher a config names.

    ``teacher.factory`` (``"package.module:function"``, optional) builds any other teacher
    from the config section, e.g. SynthMed's oracle
    (``medalign_platform.synthmed.oracle_teacher:build_oracle_teacher``); without it,
    ``teacher.name`` / ``teacher.pretrained`` load an open_clip expert with
    :func:`~medalign_platform.core.teacher.load_teacher`.
    """
    factory = teacher_config.get("factory")
    if factory:
        import importlib

        module_name, _, function = str(factory).partition(":")
        try:
            build = getattr(importlib.import_module(module_name), function)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"teacher.factory={factory!r} cannot be imported ({error}); give 'package.module:function'") from None
        return build(teacher_config)
    from ..core.teacher import load_teacher

    return load_teacher(teacher_config["name"], teacher_config.get("pretrained"))


def _field(item, name: str):
    """``item[name]`` for dataset dicts, ``item.name`` for ``ConversationItem``s."""
    return item.get(name) if isinstance(item, Mapping) else getattr(item, name, None)


class TargetLookup:
    """Maps training items to their cached teacher targets.

    The teacher is built once per worker (:func:`build_teacher`; its identity is part of
    the cache key); image content hashes are computed once per image; targets are read
    from the shared :class:`~medalign_platform.core.target_cache.TargetCache`, filled
    beforehand by :func:`precompute_targets` on the driver.

    A teacher with ``per_question = True`` (its targets depend on the question, e.g. the
    SynthMed oracle) is asked per item: ``teacher.request(fields)`` builds its input from
    the item's ``image_path``, ``mask_path`` and ``question``, and
    ``teacher.request_key(request, image_hash)`` keys the cache entry.
    """

    def __init__(self, teacher_config: dict):
        from ..core.target_cache import TargetCache

        self.teacher = build_teacher(teacher_config)
        self.cache = TargetCache(teacher_config["cache_dir"])
        self.per_question = bool(getattr(self.teacher, "per_question", False))
        self._hashes: dict[str, str] = {}

    def _hash(self, path) -> str:
        from ..core.target_cache import image_content_hash

        key = str(path)
        if key not in self._hashes:
            self._hashes[key] = image_content_hash(path)
        return self._hashes[key]

    def __call__(self, items: Sequence):
        """Teacher targets (``TeacherOutputs`` on CPU) for these items, in order.

        ``items``: dataset items (dicts or ``ConversationItem``s), or image paths for a
        teacher that is not ``per_question``.
        """
        if not self.per_question:
            paths = [str(x) if isinstance(x, (str, os.PathLike)) else str(_field(x, "image_path")) for x in items]
            return self.cache.get_or_compute(self.teacher, paths, keys=[self._hash(p) for p in paths])
        if any(isinstance(x, (str, os.PathLike)) for x in items):
            raise TypeError("this teacher's targets depend on the question: pass dataset items, not image paths")
        requests, keys = [], []
        for item in items:
            fields = {name: _field(item, name) for name in ("image_path", "mask_path", "question")}
            request = self.teacher.request(fields)
            requests.append(request)
            keys.append(self.teacher.request_key(request, self._hash(fields["image_path"])))
        return self.cache.get_or_compute(self.teacher, requests, keys=keys)


def precompute_targets(teacher_config: dict, items: SplitItems, chunk: int = 2048) -> dict:
    """Fills the shared target cache for a split; returns the cache counters.

    Runs on the driver before any worker starts, so every run and trial that uses the
    same teacher and images only reads. Per image, or per item for a ``per_question``
    teacher.
    """
    lookup = TargetLookup(teacher_config)
    if lookup.per_question:
        unique = [items.dataset.items[i] for i in items.indices]
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
                   num_beams: int = 1, on_predictions: Callable | None = None, grounding_detail: bool = False) -> dict:
    """Answers ``items`` greedily and scores them.

    Args:
        model: the student (peft-wrapped or not).
        processor: its processor.
        tap: the run's :class:`~medalign_platform.core.student.DistillationTap`; attention is
            captured during evaluation even when the run trains with ``lambda_attn = 0``.
        items: dataset items with ``answer`` and ``answer_type`` (and ``mask`` for grounding:
            the region the question is about).
        on_predictions: optional callback ``(items, predictions, attentions)`` (e.g. TensorBoard).
        grounding_detail: add the answer position's grounding per layer and head
            (:func:`~medalign_platform.run.grounding.answer_grounding`).

    Returns:
        ``closed_accuracy``, ``open_recall``, ``open_f1``, report BLEU-4/ROUGE-L where
        present, counts, and over items whose mask is not empty: ``grounding_layer``
        (block L's attention, heads and prompt tokens averaged; ``grounding`` is the same
        number under its first name), ``grounding_answer``, ``pointing_answer`` and
        ``grounding_answer_l{l}`` (the answer position's attention, see
        :mod:`medalign_platform.run.grounding`).
    """
    from .grounding import AnswerAttentionTap, answer_grounding

    capture, tap.capture_attention = tap.capture_attention, True
    answer_tap = AnswerAttentionTap(model)
    attentions: list[torch.Tensor] = []
    answer_rows: list[torch.Tensor] = []

    def on_batch(meta, _):
        attentions.append(_prompt_attention(tap, len(meta)))
        rows = answer_tap.pop()
        answer_rows.append(rows[:: rows.shape[0] // len(meta)])  # beam search repeats each prompt

    try:
        predictions = generate_answers(
            model, processor, items, batch_size=batch_size, max_new_tokens=max_new_tokens, num_beams=num_beams,
            on_batch=on_batch,
        )
    finally:
        tap.capture_attention = capture
        answer_tap.remove()
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
        metrics["grounding_layer"] = mean_grounding_score(torch.tensor(scores))
        metrics["grounding"] = metrics["grounding_layer"]
    metrics.update(answer_grounding(torch.cat(answer_rows), [item.get("mask") for item in items], grid,
                                    detail=grounding_detail))
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
    )
