"""SynthMed's text: the base model's pre-training corpus and the benchmark task.

Two kinds of text are written for every image (see ``generator.py`` for the files):

* **Pre-training corpus** (``pretrain_<split>.json``): what the base LVLM is trained on
  before any MedAlign run, like an LVLM's captioning and instruction data. One report per
  image ("two lesions: a large round bright lesion in the left upper quadrant and ..."),
  presence, count and where the lesions are, and on single-lesion images the lesion's
  shape, size and contrast. None of them names a place and asks what is there.
* **Benchmark task** (``<split>.json``): location-conditioned attribute questions on
  images with two or more lesions, one closed and one open per lesion: "in the left upper quadrant, is the lesion round?",
  "in the left upper quadrant, what is the shape of the lesion?". A closed question asks
  about the lesion's true value or, for a "no", about the value of *another lesion in the
  same image* whenever one differs (a distractor), so a reader that pools the whole image
  ("is there a round lesion anywhere?") is wrong on those. Answering needs looking at the
  named place: attention routes the answer.

Every record carries ``mask``: the region the question is about (the one lesion a task
question names; every lesion for image-level questions), which the grounding measures
and the oracle teacher read. Closed answers are balanced (P(yes) = 1/2).
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
    """The benchmark task: per lesion, one closed and one open location-conditioned question.

    Only images with two or more lesions are asked (with one lesion there is nothing to
    pick out), so a "no" almost always names another lesion's value.

    The extra fields of a closed question: ``quadrant``, ``attribute``, ``distractor``
    (its "no" value is another lesion's value) and ``pooled_answer`` (what a reader that
    pools the whole image, "is there a <value> lesion?", would answer).
    """
    out: list[Question] = []
    if len(lesions) < 2:
        return out
    for lesion in lesions:
        place = f"in the {lesion.quadrant} quadrant"
        attribute = _pick(rng, list(ATTRIBUTES))
        values, true = ATTRIBUTES[attribute], lesion.value(attribute)
        others = sorted({o.value(attribute) for o in lesions if o is not lesion and o.value(attribute) != true},
                        key=values.index)
        if rng.random() < P_YES:
            value, answer, distractor = true, "yes", False
        elif others:
            value, answer, distractor = _pick(rng, others), "no", True
        else:
            value, answer, distractor = _pick(rng, [v for v in values if v != true]), "no", False
        pooled = "yes" if any(o.value(attribute) == value for o in lesions) else "no"
        extra = {"quadrant": lesion.quadrant, "attribute": attribute, "distractor": distractor,
                 "pooled_answer": pooled}
        out.append((attribute, "closed", f"{place}, is the lesion {value}?", answer, (lesion.label,), extra))
        attribute = _pick(rng, list(ATTRIBUTES))
        out.append((attribute, "open", f"{place}, what is the {attribute} of the lesion?", lesion.value(attribute),
                    (lesion.label,), {"quadrant": lesion.quadrant, "attribute": attribute}))
    return out
