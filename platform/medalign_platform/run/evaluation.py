"""Evaluation and teacher targets for a run: greedy answers, metrics, grounding, the target cache.

Evaluation generates greedy (or beam) answers for a fixed, deterministic subset of a split
and scores them with :mod:`medalign_platform.data.metrics`. The grounding score comes for free:
the distillation tap records the student's text-to-image attention at layer ``L`` during
``generate()``'s prefill, which is compared with each image's lesion mask.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..common.errors import ConfigError, MedAlignError
from ..data.collate import generate_answers
from ..data.metrics import evaluation_metrics, grounding_score, mean_grounding_score, metric_names
from ..data.prompts import clean_question
from ..data.splits import SplitItems, evaluation_items, load_split

if TYPE_CHECKING:
    from .settings import RunSettings, TeacherSettings


def build_teacher(teacher: TeacherSettings):
    """The teacher a ``teacher`` section names.

    ``teacher.factory`` (``"package.module:function"``) builds any other teacher from the
    section, e.g. SynthMed's oracle (``medalign_platform.synthmed.oracle_teacher:build_oracle_teacher``);
    without it, ``teacher.name`` / ``teacher.pretrained`` load an open_clip or transformers
    expert with :func:`~medalign_platform.core.teacher.load_teacher`.
    """
    if teacher.factory:
        import importlib

        module_name, _, function = str(teacher.factory).partition(":")
        try:
            build = getattr(importlib.import_module(module_name), function)
        except (ImportError, AttributeError) as error:
            raise ConfigError(f"teacher.factory={teacher.factory!r} cannot be imported ({error}); give "
                              "'package.module:function'") from None
        return build(teacher)
    from ..core.teacher import load_teacher

    return load_teacher(teacher.name, teacher.pretrained)


@dataclass(frozen=True)
class TeacherKey:
    """What identifies a teacher's targets in the cache: its fingerprints, native grid and width.

    ``prompt_identity`` keys the question-conditioned maps (``teacher.attention=prompt_aware``);
    None when the teacher has no text tower.
    """

    identity: str
    grid: tuple[int, int]
    width: int
    prompt_identity: str | None = None

    @classmethod
    def of(cls, teacher) -> "TeacherKey":
        prompt = teacher.prompt_identity if getattr(teacher, "has_text", True) else None
        return cls(teacher.identity, tuple(teacher.grid), int(teacher.width), prompt)

    @classmethod
    def from_fields(cls, fields: dict) -> "TeacherKey":
        return cls(fields["identity"], tuple(fields["grid"]), int(fields["width"]), fields.get("prompt_identity"))

    def fields(self) -> dict:
        return {"identity": self.identity, "grid": list(self.grid), "width": self.width,
                "prompt_identity": self.prompt_identity}


class TargetLookup:
    """Maps image files (and, prompt-aware, their questions) to their cached teacher targets.

    The teacher is loaded once (its weights define the cache key, :class:`TeacherKey`), or
    not at all when the cache has recorded the key for its unchanged files; image content
    hashes are computed once per image; targets are read from the shared
    :class:`~medalign_platform.core.target_cache.TargetCache`, filled beforehand by
    :func:`precompute_targets` on the driver. Data-loader workers use the training
    process's lookup (forked, so the teacher model is shared, not copied). Built from a
    ``key`` alone, a lookup loads the teacher only if an entry is missing from the cache
    (benchmarks use this with a cache of random targets and no teacher at all).

    Args:
        teacher: the ``teacher`` section (``cache_dir``, ``attention``; ``name``/``pretrained``
            to load it).
        model: an already loaded teacher (instead of loading ``teacher.name``).
        key: the teacher's key when already known; the teacher is then not loaded up front.
            Without ``model`` or ``key``, the key recorded in the cache for the teacher's
            unchanged files is used (:mod:`.teacher_keys`), else the teacher is loaded and
            its key recorded there.
    """

    def __init__(self, teacher: TeacherSettings, model=None, *, key: TeacherKey | None = None):
        from ..core.target_cache import TargetCache
        from .teacher_keys import remember_key, remembered_key, signature

        self.settings = teacher
        self.mode = teacher.attention
        self.cache = TargetCache(teacher.cache_dir)
        self._model = model
        if key is None and model is None:
            # Taken before any load: a record's files are the ones as they were when it was loaded.
            files_signature = signature(teacher.name, teacher.pretrained, teacher.factory)
            fields = remembered_key(teacher.cache_dir, files_signature)
            if fields:
                key = TeacherKey.from_fields(fields)
            else:
                self._model = self._load()
                key = TeacherKey.of(self._model)
                remember_key(teacher.cache_dir, files_signature, key.fields())
        elif key is None:
            key = TeacherKey.of(model)
        self.key = key
        if self.mode == "prompt_aware" and key.prompt_identity is None:
            raise ConfigError(f"teacher.attention=prompt_aware but teacher {teacher.name!r} has no text tower; use "
                              "teacher.attention=cls or convert it with its text encoder")
        self._hashes: dict[str, str] = {}

    # What TargetCache needs of a teacher: the key's fields, encode_images (and the prompt-aware
    # pair) on a miss.
    @property
    def identity(self) -> str:
        return self.key.identity

    @property
    def grid(self) -> tuple[int, int]:
        return self.key.grid

    @property
    def width(self) -> int:
        return self.key.width

    @property
    def prompt_identity(self) -> str:
        if self.key.prompt_identity is None:
            raise AttributeError("this teacher has no text tower, so no prompt-aware targets")
        return self.key.prompt_identity

    @property
    def teacher(self):
        """The loaded teacher model (loaded now if this lookup was built from a key)."""
        if self._model is None:
            model = self._load()
            if model.identity != self.key.identity:
                raise MedAlignError(f"teacher {self.settings.name!r} is not the teacher the run was keyed on "
                                    f"({model.identity[:12]} != {self.key.identity[:12]}); do not change its files "
                                    "during a run")
            self._model = model
        return self._model

    def _load(self):
        if not (self.settings.name or self.settings.factory):
            raise MedAlignError(f"teacher targets are missing from the cache {self.settings.cache_dir} and "
                                "teacher.name is not set to compute them; set teacher.name (and .pretrained)")
        return build_teacher(self.settings)

    def encode_images(self, images, batch_size: int | None = None):
        return self.teacher.encode_images(images, batch_size)

    def encode_prompt_aware(self, images, questions, batch_size: int | None = None):
        return self.teacher.encode_prompt_aware(images, questions, batch_size)

    @property
    def open_input(self):
        """The teacher's own input reader, or None (the cache then decodes the image); read on a
        cache miss only, when the teacher is loaded anyway."""
        return getattr(self.teacher, "open_input", None)

    def _hash(self, path) -> str:
        from ..core.target_cache import image_content_hash

        key = str(path)
        if key not in self._hashes:
            self._hashes[key] = image_content_hash(path)
        return self._hashes[key]

    def __call__(self, image_paths: Sequence[str], questions: Sequence[str] | None = None):
        """Teacher targets (``TeacherOutputs`` on CPU) for these image files, in order.

        ``questions`` (one per image) are used only with ``teacher.attention=prompt_aware``,
        where they are required; the result then carries ``prompt_attention``.
        """
        if self.mode == "prompt_aware":
            if questions is None:
                raise ValueError("teacher.attention=prompt_aware needs the question of every image")
            questions = [clean_question(q) for q in questions]
        else:
            questions = None
        return self.cache.get_or_compute(self, list(image_paths), keys=[self._hash(p) for p in image_paths],
                                         questions=questions)


def precompute_targets(teacher: TeacherSettings, items: SplitItems, chunk: int = 2048) -> dict:
    """Fills the shared target cache for a split's images; returns the cache counters.

    Runs on the driver before any worker starts, so every run and trial that uses the
    same teacher and images only reads.
    """
    lookup = TargetLookup(teacher)
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
                   num_beams: int = 1, max_length: int = 1024, on_predictions: Callable | None = None,
                   radgraph_model: str | None = None, prompt_template: str = "auto",
                   grounding_detail: bool = False) -> dict:
    """Answers ``items`` greedily (or with beams) and scores them.

    Args:
        model: the student (peft-wrapped or not).
        processor: its processor.
        tap: the run's :class:`~medalign_platform.core.tap.DistillationTap`, whose prefill
            capture gives the grounding score (captured during evaluation even when the run
            trains with ``lambda_attn = 0``); None scores answers only.
        items: dataset items with ``answer`` and ``answer_type`` (and ``mask`` for grounding).
        max_length: most prompt tokens (see :class:`~medalign_platform.data.collate.StudentCollator`).
        on_predictions: optional callback ``(items, predictions, attentions)`` (e.g. TensorBoard);
            ``attentions`` is None without a tap.
        radgraph_model: optional local RadGraph model folder for ``report_radgraph_f1``.
        prompt_template: ``model.prompt_template`` (see :mod:`medalign_platform.data.prompts`).
        grounding_detail: add the answer position's grounding per layer and head
            (:func:`~medalign_platform.run.grounding.answer_grounding`).

    Returns:
        ``closed_accuracy`` (and ``closed_accuracy_substring``, the original rule),
        ``open_recall``, ``open_f1``, report BLEU-1..4/ROUGE-L where present, per question
        type ``by_qtype/...`` breakdowns and counts (see
        :func:`~medalign_platform.data.metrics.evaluation_metrics`); with a tap, over items
        whose mask (the region the question is about) is not empty: ``grounding_layer``
        (block L's attention, heads and prompt tokens averaged: what the attention loss
        trains; ``grounding`` is the same number under its first name), and
        ``grounding_answer``, ``pointing_answer``, ``grounding_answer_l{l}`` (the answer
        position's attention, see :mod:`medalign_platform.run.grounding`).
    """
    from .grounding import AnswerAttentionTap, answer_grounding

    attentions: list[torch.Tensor] = []
    answer_rows: list[torch.Tensor] = []
    on_batch = answer_tap = None
    if tap is not None:
        capture, tap.capture_attention = tap.capture_attention, True
        answer_tap = AnswerAttentionTap(model)

        def on_batch(meta, _):
            attentions.append(_prompt_attention(tap, len(meta)))
            rows = answer_tap.pop()
            answer_rows.append(rows[:: rows.shape[0] // len(meta)])  # beam search repeats each prompt
    try:
        predictions = generate_answers(model, processor, items, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                       num_beams=num_beams, max_length=max_length, on_batch=on_batch,
                                       prompt_template=prompt_template)
    finally:
        if tap is not None:
            tap.capture_attention = capture
            answer_tap.remove()
    records = [
        {"prediction": p, "reference": item["answer"], "answer_type": item["answer_type"],
         "question_type": item.get("question_type")}
        for p, item in zip(predictions, items)
    ]
    metrics = {k: v for k, v in evaluation_metrics(records, radgraph_model=radgraph_model).items()
               if not (isinstance(v, float) and np.isnan(v))}
    attention = torch.cat(attentions) if attentions else None  # [n, N]
    if attention is not None:
        scores = []
        for item, row in zip(items, attention):
            mask = item.get("mask")
            if mask is not None and mask.any():
                scores.append(float(grounding_score(row, torch.as_tensor(mask), tap.grid)))
        if scores:
            metrics["grounding_layer"] = mean_grounding_score(torch.tensor(scores))
            metrics["grounding"] = metrics["grounding_layer"]
        metrics.update(answer_grounding(torch.cat(answer_rows), [item.get("mask") for item in items], tap.grid,
                                        detail=grounding_detail))
    if on_predictions is not None:
        on_predictions(items, predictions, attention)
    return metrics


def evaluate_split(model, processor, objective, settings: RunSettings, split: str,
                   on_predictions: Callable | None = None) -> dict:
    """Evaluates the run's model on ``split`` (``val`` subset during training, ``test`` at the end)."""
    trainer = settings.trainer
    size = trainer.val_size if split == "val" else trainer.test_size
    items = evaluation_items(load_split(settings.data, split), size)
    return evaluate_items(
        model, processor, objective.tap, items, batch_size=trainer.eval_batch_size,
        max_new_tokens=trainer.max_new_tokens, num_beams=trainer.num_beams, on_predictions=on_predictions,
        radgraph_model=settings.data.radgraph_model, prompt_template=settings.model.prompt_template,
    )


def split_metric_names(items: SplitItems, radgraph: bool = False) -> set[str]:
    """The metric keys (without the split prefix) an evaluation of this split can report."""
    chosen = [items.dataset.items[i] for i in items.indices]
    return metric_names({item.answer_type for item in chosen}, {item.question_type for item in chosen},
                        has_masks=any(item.mask_path is not None for item in chosen), radgraph=radgraph)


def check_metric_names(wanted: Mapping[str, str], splits: Mapping[str, SplitItems], radgraph: bool = False) -> None:
    """Checks that every ``setting -> "val/<name>"`` (or ``test/``) metric is one the evaluation reports.

    Runs on the driver before anything trains: a sweep on a metric its trials never report
    would otherwise fail once its first trial has trained.

    Raises:
        ConfigError: naming the setting, the metric, the closest valid one and the choices.
    """

    for setting, metric in wanted.items():
        split, _, name = str(metric).partition("/")
        if split not in splits:
            continue
        names = split_metric_names(splits[split], radgraph=radgraph)
        if name in names:
            continue
        scores = sorted(n for n in names if not n.startswith("n_") and "/n_" not in n)
        close = difflib.get_close_matches(name, scores, n=1)
        hint = f"did you mean {split}/{close[0]}? " if close else ""
        kinds = sorted({splits[split].dataset.items[i].answer_type for i in splits[split].indices})
        raise ConfigError(f"{setting}={metric} is not reported by the evaluation of this data ({split} split, "
                          f"answer types {kinds}); {hint}choose one of "
                          f"{[f'{split}/{n}' for n in scores if not n.startswith('by_qtype/')]}")
