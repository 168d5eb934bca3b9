"""SynthMed's text: the base model's pre-training corpus and the benchmark task.

Two kinds of text are written for every image (see ``generator.py`` for the files):

* **Pre-training corpus** (``pretrain_<split>.json``): what the base LVLM is trained on
  before any MedAlign run, like an LVLM's captioning and instruction data. One report per
  image ("two lesions: a large round bright lesion in the left upper quadrant and ..."),
  presence, count and where the lesions are, and on single-lesion images the lesion's
  shape, size and contrast. None of them names a place and asks what is there.
* **Benchmark task** (``<split>.json``): location-conditioned questions. Closed: on every
  image with a lesion, "in the left upper quadrant, is there a lesion?" once about a
  quadrant that holds one ("yes") and once about an empty quadrant ("no"; SynthMed images
  hold at most three lesions, so one always exists). A reader that pools the whole image
  ("is there a lesion anywhere?") answers "yes" to both, so it scores 1/2, as do
  always-"no" and the question text alone. Open, on images with two or more lesions, per
  lesion: "in the left upper quadrant, what is the size of the lesion?", whose answer is
  that lesion's value and differs from the other lesions' values where the attribute has
  enough of them. Answering needs looking at the named place: attention routes the answer.

  Version 2 asked closed attribute questions ("in the left upper quadrant, is the lesion
  faint?") instead; the tiny student never learned to answer them, not even fully
  fine-tuned on 15k such questions (train accuracy 0.52, docs/synthmed.md), while it
  learns the presence questions (LoRA: 0.96 after 1000 steps).

Every record carries ``mask``: the region the question is about (the lesion in the
quadrant a task question names, or that quadrant itself when it is empty; every lesion
for image-level questions), which the grounding measures and the oracle teacher read. Closed answers are balanced (P(yes) = 1/2).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "ATTRIBUTES",
    "CONTRASTS",
    "COUNT_WORDS",
    "QUADRANTS",
    "SHAPES",
    "SIDES",
    "SIZES",
    "SYNTHMED_PUNCTUATION",
    "SYNTHMED_WORDS",
    "LesionFacts",
    "pretrain_questions",
    "report",
    "task_questions",
]

QUADRANTS = ("left upper", "right upper", "left lower", "right lower")
SIDES = ("left", "right")
SHAPES = ("round", "elongated", "irregular")
SIZES = ("small", "medium", "large")
CONTRASTS = ("bright", "faint")
COUNT_WORDS = ("zero", "one", "two", "three")
#: The attributes a question can ask about, with their values. Shape is drawn and reported
#: but not asked: the tiny student's 8 px patches read it poorly (see docs/synthmed.md).
ATTRIBUTES: dict[str, tuple[str, ...]] = {"size": SIZES, "contrast": CONTRASTS}

#: Every word of every question, answer and report (lowercase, sorted).
SYNTHMED_WORDS: list[str] = [
    "a", "and", "are", "bright", "contrast", "describe", "elongated", "faint", "findings", "how",
    "in", "irregular", "is", "large", "left", "lesion", "lesions", "lower", "many", "medium", "no",
    "normal", "of", "one", "quadrant", "right", "round", "size", "small", "study", "the", "there",
    "three", "two", "upper", "what", "where", "yes", "zero",
]
#: The only non-letter, non-space characters in the text (besides the "<image>" token).
SYNTHMED_PUNCTUATION = ".,:?"

#: P(yes) of a closed question when both a "yes" and a "no" value can be asked.
P_YES = 0.5


@dataclass(frozen=True)
class LesionFacts:
    """What the text may say about one lesion (label = its value in the label mask)."""

    label: int
    quadrant: str
    shape: str
    size: str
    contrast: str

    def value(self, attribute: str) -> str:
        return getattr(self, attribute)


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _phrase(lesion: LesionFacts) -> str:
    return f"a {lesion.size} {lesion.shape} {lesion.contrast} lesion in the {lesion.quadrant} quadrant"


def report(lesions: Sequence[LesionFacts]) -> str:
    """One report; attributes come before the place, so it never reads place -> attribute."""
    if not lesions:
        return "no lesion. normal study."
    phrases = [_phrase(lesion) for lesion in lesions]
    body = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"{COUNT_WORDS[len(lesions)]} lesion{'s' if len(lesions) > 1 else ''}: {body}."


def _closed(rng, present: Sequence[str], absent: Sequence[str]) -> tuple[str, str]:
    """A value to ask about: a present one with P = P_YES when both kinds exist."""
    if present and (not absent or rng.random() < P_YES):
        return _pick(rng, present), "yes"
    return _pick(rng, absent), "no"


# A question is (question_type, answer_type, question, answer, mask labels, extra fields).
Question = tuple[str, str, str, str, tuple[int, ...], dict]


def pretrain_questions(rng: np.random.Generator, lesions: Sequence[LesionFacts]) -> list[Question]:
    """The base model's pre-training corpus for one image: captions and single-lesion questions.

    Every image: the report, presence, count and where the lesions are. Images with one
    lesion also get that lesion's attributes asked, closed ("is the lesion round?") and
    open ("what is the shape of the lesion?"): the base model learns to read a lesion,
    but never to pick one out of several by a place the question names.
    """
    labels = tuple(lesion.label for lesion in lesions)
    k = len(lesions)
    out: list[Question] = [("report", "report", "describe the findings.", report(lesions), labels, {})]
    out.append(("presence", "closed", "is there a lesion?", "yes" if k else "no", labels, {}))
    out.append(("count", "open", "how many lesions are there?", COUNT_WORDS[k], labels, {}))
    if k:
        places = " and ".join(f"{lesion.quadrant} quadrant" for lesion in lesions)
        noun = "the lesion" if k == 1 else "the lesions"
        out.append(("quadrant", "open", f"where {'is' if k == 1 else 'are'} {noun}?", places, labels, {}))
    if k == 1:
        lesion = lesions[0]
        for attribute, values in ATTRIBUTES.items():
            value, answer = _closed(rng, [lesion.value(attribute)], [v for v in values if v != lesion.value(attribute)])
            out.append((attribute, "closed", f"is the lesion {value}?", answer, labels, {}))
            out.append((attribute, "open", f"what is the {attribute} of the lesion?", lesion.value(attribute),
                        labels, {}))
    return out


def task_questions(rng: np.random.Generator, lesions: Sequence[LesionFacts]) -> list[Question]:
    """The benchmark task for one image: location-conditioned questions.

    Closed (images with a lesion): "is there a lesion?" about one quadrant holding a lesion
    ("yes") and one empty quadrant ("no"), in random order. Open (images with two or more
    lesions): per lesion, its size or contrast, asked by its quadrant.

    Extra fields: ``quadrant`` (the place the question names) and ``attribute``
    (``presence``, ``size`` or ``contrast``); closed questions also ``distractor`` (a "no"
    whose image holds lesions elsewhere: always, by construction) and ``pooled_answer``
    (what a reader that pools the whole image answers: "yes"). A "no" question's mask
    labels are empty: its region is the named quadrant (``generator.py`` writes that mask).
    """
    out: list[Question] = []
    if not lesions:
        return out
    held = {lesion.quadrant: lesion for lesion in lesions}
    empty = [quadrant for quadrant in QUADRANTS if quadrant not in held]
    full = _pick(rng, [quadrant for quadrant in QUADRANTS if quadrant in held])
    closed = [(full, "yes", (held[full].label,)), (_pick(rng, empty), "no", ())]
    if rng.random() < 0.5:
        closed.reverse()
    for quadrant, answer, labels in closed:
        out.append(("presence", "closed", f"in the {quadrant} quadrant, is there a lesion?", answer, labels,
                    {"quadrant": quadrant, "attribute": "presence", "distractor": answer == "no",
                     "pooled_answer": "yes"}))
    if len(lesions) < 2:
        return out
    for lesion in lesions:
        attribute = _pick(rng, list(ATTRIBUTES))
        out.append((attribute, "open", f"in the {lesion.quadrant} quadrant, what is the {attribute} of the lesion?",
                    lesion.value(attribute), (lesion.label,), {"quadrant": lesion.quadrant, "attribute": attribute}))
    return out
