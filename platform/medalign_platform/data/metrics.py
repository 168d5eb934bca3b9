"""Evaluation metrics: Med-VQA answers, report generation and visual grounding.

See ../shared/method.md, "Evaluation in the original work". All scores are on a 0-1 scale
(multiply by 100 to compare with the percentages and BLEU numbers papers report). A metric
over an empty list of items is ``nan``, not 0, so that "no items of this type" cannot be
mistaken for "all wrong".

Answer normalisation (:func:`normalize_answer`) is applied to both sides of every text
metric:

* lowercase (Unicode NFKC first, so full-width characters fold);
* apostrophes are deleted (``"patient's"`` -> ``"patients"``), every other punctuation
  character (ASCII ``string.punctuation`` and Unicode category ``P*``) becomes a space
  (``"x-ray"`` -> ``"x ray"``), except that a ``.`` between two digits is kept
  (``"2.5 cm"`` stays ``"2.5 cm"``) and a ``,`` before three digits is dropped
  (``"1,000"`` -> ``"1000"``);
* the articles ``a``, ``an``, ``the`` are removed as whole tokens;
* number WORDS BECOME DIGITS, token by token: ``zero``..``twenty`` and the tens
  ``thirty``..``ninety`` (``"two"`` -> ``"2"``). Compounds are not combined
  (``"twenty one"`` -> ``"20 1"``), which is consistent on both sides and rare in Med-VQA;
* whitespace is collapsed.

Closed questions (:func:`closed_accuracy`):

* ``closed_match="exact"`` (default): the *decision* of an answer is its first normalised
  token when that token is ``yes`` or ``no`` (so ``"Yes, there is."`` -> ``yes``), otherwise
  the whole normalised string (closed questions such as "left or right?" answer ``left``).
  The decisions of prediction and reference must be equal.
* ``closed_match="substring"``: the original LLaVA-Med/MedAlign check, kept only for
  compatibility: the normalised reference is a character substring of the normalised
  prediction. It is flawed: reference ``no`` matches ``"normal"``, ``"nodule"``, ``"not
  sure"`` and also ``"yes, ... no ..."``; a prediction that lists every option is always
  right.

Open questions: :func:`open_recall` (the usual LLaVA-Med "open" number) and
:func:`open_token_f1`, both on bags (multisets) of whitespace tokens of the normalised
strings, averaged over items. When the normalised reference is empty, an item scores 1 if
the normalised prediction is empty too and 0 otherwise (the SQuAD convention).

Reports: :func:`bleu4` is corpus BLEU-4 from ``sacrebleu`` (``corpus_bleu`` with its
default ``exp`` smoothing and ``13a`` tokenisation, uniform 1-4-gram weights, brevity
penalty), divided by 100 so it is 0-1. Corpus BLEU-4 of a corpus whose sentences all have
fewer than 4 tokens is 0 (no 4-grams), so it says little on short VQA answers.
:func:`rouge_l` is the mean over items of the ROUGE-L F-measure from Google's
``rouge-score`` (sentence-level LCS, no stemming, its own lowercase alphanumeric
tokeniser), 0-1. Neither needs downloaded data files. Both normalise with
:func:`normalize_answer` first unless ``normalize=False``; note that removing articles
and mapping numbers changes BLEU relative to papers that only lowercase.

Grounding (:func:`grounding_score`): how much of the student's text-to-image attention at
the distillation layer falls on the lesion, relative to chance. Callers aggregate heads
and answer tokens into one distribution over the ``h*w`` visual tokens first.
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Literal

import torch

ClosedMatch = Literal["exact", "substring"]

ARTICLES = frozenset({"a", "an", "the"})

NUMBER_WORDS: dict[str, str] = {
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
    "eleven": "11",
    "twelve": "12",
    "thirteen": "13",
    "fourteen": "14",
    "fifteen": "15",
    "sixteen": "16",
    "seventeen": "17",
    "eighteen": "18",
    "nineteen": "19",
    "twenty": "20",
    "thirty": "30",
    "forty": "40",
    "fifty": "50",
    "sixty": "60",
    "seventy": "70",
    "eighty": "80",
    "ninety": "90",
}

_APOSTROPHES = frozenset("'\u2018\u2019\u02bc`")
# Thousands separators between digits are dropped ("1,000" -> "1000"); decimal points
# between digits are shielded behind a non-punctuation placeholder while punctuation goes.
_THOUSANDS_SEPARATOR = re.compile(r"(?<=\d),(?=\d{3})")
_DECIMAL_POINT = re.compile(r"(?<=\d)\.(?=\d)")
_DECIMAL_PLACEHOLDER = "\x00"


def _is_punctuation(char: str) -> bool:
    return char in string.punctuation or unicodedata.category(char).startswith("P")


def normalize_answer(text: str) -> str:
    """Lowercases, strips punctuation and articles, maps number words to digits.

    ``"The TWO lesions, left-sided."`` -> ``"2 lesions left sided"``. See the module
    docstring for the exact rules.
    """
    if text is None:
        return ""
    text = unicodedata.normalize("NFKC", str(text)).lower()
    text = _THOUSANDS_SEPARATOR.sub("", text)
    text = _DECIMAL_POINT.sub(_DECIMAL_PLACEHOLDER, text)
    out = []
    for char in text:
        if char in _APOSTROPHES:
            continue
        out.append(" " if _is_punctuation(char) else char)
    text = "".join(out).replace(_DECIMAL_PLACEHOLDER, ".")
    tokens = [NUMBER_WORDS.get(tok, tok) for tok in text.split() if tok not in ARTICLES]
    return " ".join(tokens)


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    if isinstance(predictions, str) or isinstance(references, str):
        raise TypeError("predictions and references must be sequences of strings, not a single string")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


def closed_decision(text: str) -> str:
    """The yes/no decision of a closed answer: first normalised token if yes/no, else all of it."""
    normalized = normalize_answer(text)
    first = normalized.split(" ", 1)[0]
    return first if first in ("yes", "no") else normalized


def closed_correct(prediction: str, reference: str, closed_match: ClosedMatch = "exact") -> bool:
    """Whether one closed answer is right under ``closed_match`` (see the module docstring)."""
    if closed_match == "exact":
        return closed_decision(prediction) == closed_decision(reference)
    if closed_match == "substring":
        return normalize_answer(reference) in normalize_answer(prediction)
    raise ValueError(f"closed_match must be 'exact' or 'substring', got {closed_match!r}")


def closed_accuracy(
    predictions: Sequence[str], references: Sequence[str], closed_match: ClosedMatch = "exact"
) -> float:
    """Fraction of closed questions answered right (0-1; nan for no items)."""
    _check_pairs(predictions, references)
    return _mean([float(closed_correct(p, r, closed_match)) for p, r in zip(predictions, references)])


def _token_overlap(prediction: str, reference: str) -> tuple[int, int, int]:
    """(common, prediction length, reference length) of the normalised token bags."""
    pred_tokens = normalize_answer(prediction).split()
    ref_tokens = normalize_answer(reference).split()
    common = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    return common, len(pred_tokens), len(ref_tokens)


def token_recall(prediction: str, reference: str) -> float:
    """Share of the reference's normalised tokens (a multiset) found in the prediction."""
    common, n_pred, n_ref = _token_overlap(prediction, reference)
    if n_ref == 0:
        return float(n_pred == 0)
    return common / n_ref


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall on normalised token bags."""
    common, n_pred, n_ref = _token_overlap(prediction, reference)
    if n_ref == 0 or n_pred == 0:
        return float(n_ref == n_pred)
    if common == 0:
        return 0.0
    precision, recall = common / n_pred, common / n_ref
    return 2 * precision * recall / (precision + recall)


def open_recall(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean token recall of the reference (LLaVA-Med's "open" number), 0-1."""
    _check_pairs(predictions, references)
    return _mean([token_recall(p, r) for p, r in zip(predictions, references)])


def open_token_f1(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean token F1 between prediction and reference, 0-1."""
    _check_pairs(predictions, references)
    return _mean([token_f1(p, r) for p, r in zip(predictions, references)])


def bleu4(predictions: Sequence[str], references: Sequence[str], normalize: bool = True) -> float:
    """Corpus BLEU-4 (sacrebleu, exp smoothing, 13a tokeniser) on a 0-1 scale; nan for no items."""
    _check_pairs(predictions, references)
    if not predictions:  # before the import: scoring closed answers alone needs no sacrebleu
        return float("nan")
    from sacrebleu.metrics import BLEU

    prep = normalize_answer if normalize else (lambda s: "" if s is None else str(s))
    hyps = [prep(p) for p in predictions]
    refs = [prep(r) for r in references]
    score = BLEU(max_ngram_order=4, smooth_method="exp", tokenize="13a", force=True).corpus_score(hyps, [refs])
    return min(1.0, score.score / 100.0)


_ROUGE_SCORER = None


def rouge_l(predictions: Sequence[str], references: Sequence[str], normalize: bool = True) -> float:
    """Mean ROUGE-L F-measure (rouge-score, no stemmer), 0-1; nan for no items."""
    global _ROUGE_SCORER
    _check_pairs(predictions, references)
    if not predictions:
        return float("nan")
    if _ROUGE_SCORER is None:
        from rouge_score import rouge_scorer

        _ROUGE_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    prep = normalize_answer if normalize else (lambda s: "" if s is None else str(s))
    scores = [_ROUGE_SCORER.score(prep(r), prep(p))["rougeL"].fmeasure for p, r in zip(predictions, references)]
    return _mean(scores)


# --------------------------------------------------------------------------------------
# Grounding
# --------------------------------------------------------------------------------------


def _area_matrix(out_size: int, in_size: int) -> torch.Tensor:
    """[out, in] weights: overlap of input pixel j with output cell i, over the cell's length.

    Cell i spans [i*in/out, (i+1)*in/out) in pixel units, so each row sums to 1 and
    ``R @ x`` is the exact area average of x over each cell, for any sizes (divisible or not).
    """
    scale = in_size / out_size
    cell_lo = torch.arange(out_size, dtype=torch.float64)[:, None] * scale
    cell_hi = cell_lo + scale
    pix_lo = torch.arange(in_size, dtype=torch.float64)[None, :]
    overlap = (torch.minimum(cell_hi, pix_lo + 1) - torch.maximum(cell_lo, pix_lo)).clamp(min=0)
    return overlap / scale


def mask_to_grid(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Fraction of each of the ``h x w`` grid cells covered by the mask ([..., H, W] -> [..., h, w]).

    Exact area averaging (equal to ``F.adaptive_avg_pool2d`` when H, W are multiples of
    h, w); a soft mask in [0, 1] is averaged the same way.
    """
    h, w = int(grid[0]), int(grid[1])
    m = mask.to(torch.float64)
    rows = _area_matrix(h, m.shape[-2]).to(m.device)
    cols = _area_matrix(w, m.shape[-1]).to(m.device)
    return rows @ m @ cols.T


def grounding_score(
    attention: torch.Tensor, mask: torch.Tensor, grid: tuple[int, int]
) -> torch.Tensor | float:
    """Attention mass on the lesion divided by the lesion's area fraction.

    Args:
        attention: ``[B, N]`` or ``[N]`` non-negative text-to-image attention over the
            ``N = h*w`` visual tokens in row-major order (need not sum to 1; it is
            renormalised).
        mask: ``[B, H, W]`` or ``[H, W]`` lesion mask at image resolution, bool or 0-1.
        grid: ``(h, w)`` of the visual-token grid.

    Returns:
        ``score = (sum_i a_i m_i / sum_i a_i) / mean_i m_i`` with ``m`` the mask's covered
        fraction of each grid cell: 1.0 is chance (uniform attention), values above 1 mean
        the attention concentrates on the lesion, the maximum is ``1 / mean(m)``. A float
        for unbatched input, else a float32 tensor ``[B]``. A sample whose mask is empty
        (or whose attention sums to 0) has no defined score and gives ``nan``; average
        with :func:`mean_grounding_score`, which skips them.
    """
    unbatched = attention.dim() == 1
    if unbatched != (mask.dim() == 2) or attention.dim() not in (1, 2) or mask.dim() not in (2, 3):
        raise ValueError(
            f"attention must be [B, N] with mask [B, H, W] (or [N] with [H, W]); "
            f"got {tuple(attention.shape)} and {tuple(mask.shape)}"
        )
    h, w = int(grid[0]), int(grid[1])
    a = attention.detach().to(torch.float64).reshape(-1, attention.shape[-1])
    m = mask.detach().reshape(-1, *mask.shape[-2:])
    if a.shape[0] != m.shape[0]:
        raise ValueError(f"attention has batch {a.shape[0]} but mask has batch {m.shape[0]}")
    if a.shape[1] != h * w:
        raise ValueError(f"attention has {a.shape[1]} visual tokens but grid {h}x{w} implies {h * w}")
    cells = mask_to_grid(m, (h, w)).reshape(m.shape[0], h * w).to(a.device)
    area = cells.mean(dim=1)
    mass = a.sum(dim=1)
    on_lesion = (a * cells).sum(dim=1) / mass
    score = on_lesion / area
    score = torch.where((area > 0) & (mass > 0), score, torch.full_like(score, float("nan")))
    score = score.to(torch.float32)
    return float(score[0]) if unbatched else score


def pointing_hit(attention: torch.Tensor, mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Pointing game: does the most attended visual token lie on the mask?

    Args:
        attention: ``[B, N]`` attention over the ``N = h*w`` visual tokens (row-major).
        mask: ``[B, H, W]`` mask at image resolution (bool or 0-1).
        grid: ``(h, w)`` of the visual-token grid.

    Returns:
        float32 ``[B]``: 1.0 when the argmax cell holds any of the mask, 0.0 when not,
        ``nan`` when the mask is empty (average with :func:`mean_grounding_score`).
    """
    if attention.dim() != 2 or mask.dim() != 3 or attention.shape[0] != mask.shape[0]:
        raise ValueError(f"attention must be [B, N] and mask [B, H, W]; got {tuple(attention.shape)} and "
                         f"{tuple(mask.shape)}")
    h, w = int(grid[0]), int(grid[1])
    if attention.shape[1] != h * w:
        raise ValueError(f"attention has {attention.shape[1]} visual tokens but grid {h}x{w} implies {h * w}")
    cells = mask_to_grid(mask.detach().reshape(-1, *mask.shape[-2:]), (h, w)).reshape(mask.shape[0], h * w)
    cells = cells.to(attention.device)
    hit = cells.gather(1, attention.detach().argmax(dim=1, keepdim=True)).squeeze(1) > 0
    defined = cells.sum(dim=1) > 0
    return torch.where(defined, hit.to(torch.float32), torch.full_like(hit, float("nan"), dtype=torch.float32))


def mean_grounding_score(scores: torch.Tensor | Iterable[float] | float) -> float:
    """Mean of grounding scores ignoring ``nan`` (empty masks); ``nan`` if none is defined."""
    if isinstance(scores, torch.Tensor):
        values = scores.detach().flatten().double().tolist()
    elif isinstance(scores, (int, float)):
        values = [float(scores)]
    else:
        values = [float(s) for s in scores]
    return _mean([v for v in values if not math.isnan(v)])


# --------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------

ANSWER_TYPES = ("closed", "open", "report")


def vqa_metrics(records: Iterable[dict], closed_match: ClosedMatch = "exact") -> dict[str, float | int]:
    """Aggregates Med-VQA and report records into one dict of 0-1 scores and counts.

    Each record has ``prediction``, ``reference`` and ``answer_type`` in ``closed``,
    ``open``, ``report`` (case-insensitive, so VQA-RAD's ``CLOSED``/``OPEN`` work).

    Returns keys ``closed_accuracy``, ``open_recall``, ``open_f1``, ``open_bleu4``,
    ``report_bleu4``, ``report_rouge_l`` (``nan`` when that type has no records) and
    ``n_closed``, ``n_open``, ``n_report``.
    """
    groups: dict[str, tuple[list[str], list[str]]] = {t: ([], []) for t in ANSWER_TYPES}
    for i, record in enumerate(records):
        kind = str(record["answer_type"]).strip().lower()
        if kind not in groups:
            raise ValueError(f"record {i}: answer_type must be one of {ANSWER_TYPES}, got {record['answer_type']!r}")
        groups[kind][0].append(record["prediction"])
        groups[kind][1].append(record["reference"])
    closed, open_, report = groups["closed"], groups["open"], groups["report"]
    return {
        "closed_accuracy": closed_accuracy(*closed, closed_match=closed_match),
        "open_recall": open_recall(*open_),
        "open_f1": open_token_f1(*open_),
        "open_bleu4": bleu4(*open_),
        "report_bleu4": bleu4(*report),
        "report_rouge_l": rouge_l(*report),
        "n_closed": len(closed[0]),
        "n_open": len(open_[0]),
        "n_report": len(report[0]),
    }


# --------------------------------------------------------------------------------------
# Real-benchmark reporting: the original protocol side by side, BLEU-1..4, breakdowns
# --------------------------------------------------------------------------------------


def bleu_n(predictions: Sequence[str], references: Sequence[str], n: int, normalize: bool = True) -> float:
    """Corpus BLEU-n (cumulative 1..n-gram, uniform weights; sacrebleu, exp smoothing, 13a), 0-1.

    ``bleu_n(..., 4)`` equals :func:`bleu4`. Report-generation papers (R2Gen and after)
    list BLEU-1 to BLEU-4 computed this way (cumulative, corpus level).
    """
    if n not in (1, 2, 3, 4):
        raise ValueError(f"n must be 1..4, got {n}")
    _check_pairs(predictions, references)
    if not predictions:
        return float("nan")
    from sacrebleu.metrics import BLEU

    prep = normalize_answer if normalize else (lambda s: "" if s is None else str(s))
    hyps = [prep(p) for p in predictions]
    refs = [prep(r) for r in references]
    score = BLEU(max_ngram_order=n, smooth_method="exp", tokenize="13a", force=True).corpus_score(hyps, [refs])
    return min(1.0, score.score / 100.0)


def radgraph_f1(predictions: Sequence[str], references: Sequence[str], model_dir: str,
                reward_level: str = "partial") -> float:
    """Clinical-entity F1 (F1-RadGraph) through the optional ``radgraph`` package, 0-1.

    An optional extra, not a dependency: ``pip install radgraph`` and download its model
    (``radgraph-xl``) to ``model_dir`` beforehand; nothing is fetched at evaluation time
    (``HF_HUB_OFFLINE=1``). Untested here: neither the package's model nor network access
    is available on the development machines, so only the error paths are covered.

    Raises:
        RuntimeError: the package is not installed.
        FileNotFoundError: ``model_dir`` does not exist.
    """
    import os

    _check_pairs(predictions, references)
    try:
        from radgraph import F1RadGraph
    except ImportError:
        raise RuntimeError("data.radgraph_model is set but the 'radgraph' package is not installed. Fix: "
                           "pip install radgraph and download its model to that folder, or set "
                           "data.radgraph_model=null.") from None
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"data.radgraph_model={model_dir!r} is not a folder. Fix: download the RadGraph "
                                "model there (it is never fetched during evaluation), or set it to null.")
    if not predictions:
        return float("nan")
    scorer = F1RadGraph(reward_level=reward_level, model_type="radgraph-xl", model_cache_dir=model_dir,
                        tokenizer_cache_dir=model_dir)
    mean_reward = scorer(refs=list(references), hyps=list(predictions))[0]
    return float(mean_reward)


def _type_key(value) -> str:
    """A question type as a metric-key part: lowercase, non-alphanumerics -> ``_``."""
    text = re.sub(r"[^0-9a-z]+", "_", str(value).strip().lower()).strip("_")
    return text or "none"


def evaluation_metrics(records: Iterable[dict], closed_match: ClosedMatch = "exact",
                       radgraph_model: str | None = None) -> dict[str, float | int]:
    """Everything an evaluation reports on a real benchmark, as flat keys.

    Each record has ``prediction``, ``reference``, ``answer_type`` and optionally
    ``question_type``. Returns :func:`vqa_metrics` (with ``closed_match``) plus:

    * ``closed_accuracy_substring``: the original LLaVA-Med/MedAlign substring rule, side
      by side with the exact ``closed_accuracy`` for comparison with published numbers;
    * ``report_bleu1`` .. ``report_bleu3`` (``report_bleu4`` is in :func:`vqa_metrics`);
    * ``report_radgraph_f1`` when ``radgraph_model`` is given (optional package);
    * per question type ``T`` (answer type closed/open split inside):
      ``by_qtype/T/closed_accuracy``, ``by_qtype/T/open_recall``, ``by_qtype/T/open_f1``,
      ``by_qtype/T/n_closed``, ``by_qtype/T/n_open``; ``nan`` entries are left out.

    The answer-type breakdown is the ``closed_*`` / ``open_*`` / ``report_*`` keys with
    their ``n_*`` counts.
    """
    records = list(records)
    out: dict[str, float | int] = dict(vqa_metrics(records, closed_match=closed_match))
    kinds = [str(r["answer_type"]).strip().lower() for r in records]
    closed = [r for r, k in zip(records, kinds) if k == "closed"]
    report = [r for r, k in zip(records, kinds) if k == "report"]
    out["closed_accuracy_substring"] = closed_accuracy([r["prediction"] for r in closed],
                                                       [r["reference"] for r in closed], closed_match="substring")
    report_pairs = ([r["prediction"] for r in report], [r["reference"] for r in report])
    for n in (1, 2, 3):
        out[f"report_bleu{n}"] = bleu_n(*report_pairs, n)
    if radgraph_model and report:
        out["report_radgraph_f1"] = radgraph_f1(*report_pairs, radgraph_model)
    by_type: dict[str, list[dict]] = {}
    for record, kind in zip(records, kinds):
        if kind in ("closed", "open") and record.get("question_type"):
            by_type.setdefault(_type_key(record["question_type"]), []).append({**record, "answer_type": kind})
    for key, group in sorted(by_type.items()):
        scores = vqa_metrics(group, closed_match=closed_match)
        for name in ("closed_accuracy", "open_recall", "open_f1", "n_closed", "n_open"):
            value = scores[name]
            if not (isinstance(value, float) and math.isnan(value)):
                out[f"by_qtype/{key}/{name}"] = value
    return out


def metric_names(answer_types: Iterable[str], question_types: Iterable[str] = (), has_masks: bool = False,
                 radgraph: bool = False) -> set[str]:
    """The metric keys an evaluation can report for a split with these answer and question types.

    A score whose answer type has no item is ``nan`` and left out of the results (so a sweep
    on it would fail after its first trial trained); the counts are always there.

    Args:
        answer_types: the split's answer types (``closed``, ``open``, ``report``).
        question_types: its question types (the ``by_qtype/<type>/...`` breakdown).
        has_masks: whether some item has a lesion mask (``grounding``).
        radgraph: whether ``data.radgraph_model`` is set (``report_radgraph_f1``).
    """
    kinds = {str(kind).strip().lower() for kind in answer_types}
    names = {"n_closed", "n_open", "n_report"}
    if "closed" in kinds:
        names |= {"closed_accuracy", "closed_accuracy_substring"}
    if "open" in kinds:
        names |= {"open_recall", "open_f1", "open_bleu4"}
    if "report" in kinds:
        names |= {"report_bleu1", "report_bleu2", "report_bleu3", "report_bleu4", "report_rouge_l"}
        if radgraph:
            names.add("report_radgraph_f1")
    if has_masks:
        names.add("grounding")
    if kinds & {"closed", "open"}:
        for key in {_type_key(t) for t in question_types if t}:
            names |= {f"by_qtype/{key}/{name}" for name in ("n_closed", "n_open")}
            names |= {f"by_qtype/{key}/closed_accuracy"} if "closed" in kinds else set()
            names |= {f"by_qtype/{key}/open_recall", f"by_qtype/{key}/open_f1"} if "open" in kinds else set()
    return names
