"""Tests for medalign_platform.data.metrics (see ../shared/method.md, "Evaluation in the original work").

Expected values are worked out by hand in the comments, never by calling the function under test.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medalign_platform.data.metrics import (
    bleu4,
    closed_accuracy,
    closed_decision,
    grounding_score,
    mask_to_grid,
    mean_grounding_score,
    normalize_answer,
    open_recall,
    open_token_f1,
    rouge_l,
    vqa_metrics,
)

# ----------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The TWO lesions, left-sided.", "2 lesions left sided"),
        ("  Yes!!  ", "yes"),
        ("An x-ray of a patient's chest", "x ray of patients chest"),
        ("three", "3"),
        ("3", "3"),
        ("Twenty one", "20 1"),  # number words map token by token, compounds are not combined
        ("2.5 cm", "2.5 cm"),  # decimal point between digits survives
        ("1,000 cells", "1000 cells"),  # thousands separator is dropped
        ("1,2 and 3", "1 2 and 3"),  # a list comma is punctuation
        ("theory; another", "theory another"),  # articles only as whole tokens
        ("left\t upper\n\nquadrant", "left upper quadrant"),
        ("“Yes”…", "yes"),  # Unicode punctuation
        ("", ""),
        (None, ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_number_words_and_digits_agree():
    assert normalize_answer("Two") == normalize_answer("2") == "2"
    assert normalize_answer("zero") == "0"


# ----------------------------------------------------------------------------- closed


def test_closed_decision():
    assert closed_decision("Yes, there is.") == "yes"
    assert closed_decision("No. The lungs are clear") == "no"
    assert closed_decision("The left side") == "left side"
    assert closed_decision("normal") == "normal"


def test_closed_exact_vs_substring_flaw():
    # Reference "no" against 'normal', 'nodule', a correct "No, ..." and a wrong "yes".
    predictions = ["normal", "nodule", "No, there is not.", "yes"]
    references = ["no"] * 4
    # exact: only "No, there is not." -> 1/4
    assert closed_accuracy(predictions, references) == pytest.approx(0.25)
    assert closed_accuracy(predictions, references, closed_match="exact") == pytest.approx(0.25)
    # substring (original code): 'no' is inside 'normal', 'nodule' and 'no there is not' -> 3/4
    assert closed_accuracy(predictions, references, closed_match="substring") == pytest.approx(0.75)


def test_closed_exact_yes_prefix_and_non_yes_no():
    predictions = ["Yes, there is a mass.", "yes", "Left", "the right one"]
    references = ["yes", "No", "left.", "right"]
    # right, wrong, right ("left" == "left"), wrong ("right 1" != "right") -> 2/4
    assert closed_accuracy(predictions, references) == pytest.approx(0.5)


def test_closed_empty_and_errors():
    assert math.isnan(closed_accuracy([], []))
    with pytest.raises(ValueError):
        closed_accuracy(["yes"], ["yes", "no"])
    with pytest.raises(ValueError):
        closed_accuracy(["yes"], ["yes"], closed_match="fuzzy")


# ----------------------------------------------------------------------------- open


def test_open_recall_hand_values():
    # "upper left" covers 2 of the 3 reference tokens of "left upper quadrant".
    assert open_recall(["upper left"], ["left upper quadrant"]) == pytest.approx(2 / 3)
    # number words normalise: "two lesions" vs "2 lesions" -> 1
    assert open_recall(["Two lesions."], ["2 lesions"]) == pytest.approx(1.0)
    # multiset: reference "left left" has 2 tokens, prediction has 1 "left" -> 1/2
    assert open_recall(["left"], ["left left"]) == pytest.approx(0.5)
    # mean over items: (2/3 + 1 + 0) / 3
    value = open_recall(["upper left", "the liver", "kidney"], ["left upper quadrant", "liver", "spleen"])
    assert value == pytest.approx((2 / 3 + 1 + 0) / 3)


def test_open_token_f1_hand_values():
    # precision 2/2, recall 2/3 -> F1 = 2 * 1 * 2/3 / (1 + 2/3) = 0.8
    assert open_token_f1(["upper left"], ["left upper quadrant"]) == pytest.approx(0.8)
    # precision 1/4, recall 1/1 -> F1 = 2 * 0.25 / 1.25 = 0.4
    assert open_token_f1(["liver is enlarged here"], ["liver"]) == pytest.approx(0.4)
    assert open_token_f1(["spleen"], ["liver"]) == 0.0
    # empty reference after normalisation: 1 only if the prediction is empty too
    assert open_token_f1(["the"], ["a"]) == 1.0
    assert open_recall(["liver"], ["."]) == 0.0
    assert math.isnan(open_token_f1([], []))


# ----------------------------------------------------------------------------- BLEU / ROUGE


def test_bleu4_identical_and_disjoint():
    sentence = "There is a small nodule in the left lower lobe."
    assert bleu4([sentence], [sentence]) == pytest.approx(1.0)
    assert bleu4(["heart size is normal"], ["small nodule in left lobe"]) == 0.0
    assert math.isnan(bleu4([], []))


def test_bleu4_brevity_penalty_hand_value():
    # All n-gram precisions are 1; hypothesis 4 tokens, reference 8 -> BP = exp(1 - 8/4) = e^-1.
    hyp = "alpha beta gamma delta"
    ref = "alpha beta gamma delta epsilon zeta eta theta"
    assert bleu4([hyp], [ref]) == pytest.approx(math.exp(-1), rel=1e-6)


def test_rouge_l_hand_values():
    # After normalisation: "police killed gunman" vs "police kill gunman":
    # LCS = (police, gunman) = 2, P = R = 2/3 -> F = 2/3.
    assert rouge_l(["police killed the gunman"], ["police kill the gunman"]) == pytest.approx(2 / 3)
    # pred (opacity in left lobe), ref (left lower lobe opacity): LCS = (left, lobe) = 2,
    # P = 2/4, R = 2/4 -> F = 0.5. Mean of the two items = (2/3 + 1/2) / 2.
    value = rouge_l(
        ["police killed the gunman", "opacity in left lobe"],
        ["police kill the gunman", "left lower lobe opacity"],
    )
    assert value == pytest.approx((2 / 3 + 0.5) / 2)
    assert rouge_l(["same words here"], ["same words here"]) == pytest.approx(1.0)
    assert rouge_l(["heart"], ["lung"]) == 0.0


# ----------------------------------------------------------------------------- grounding


def _quadrant_mask(size: int = 64) -> torch.Tensor:
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[: size // 2, : size // 2] = True
    return mask


def test_grounding_uniform_attention_is_chance():
    attention = torch.full((64,), 1 / 64)
    assert grounding_score(attention, _quadrant_mask(), grid=(8, 8)) == pytest.approx(1.0)
    # an irregular mask gives chance too
    mask = torch.zeros(64, 64)
    mask[5:40, 13:17] = 1
    assert grounding_score(attention, mask, grid=(8, 8)) == pytest.approx(1.0)


def test_grounding_all_attention_inside_quarter_mask_is_four():
    # Quarter mask = top-left 4x4 of the 8x8 grid; attention spread over those 16 cells.
    attention = torch.zeros(8, 8)
    attention[:4, :4] = 1 / 16
    score = grounding_score(attention.flatten(), _quadrant_mask(), grid=(8, 8))
    assert isinstance(score, float)
    assert score == pytest.approx(4.0)
    # unnormalised attention is renormalised; a 0/1 float mask equals the bool mask
    assert grounding_score(5 * attention.flatten(), _quadrant_mask().float(), grid=(8, 8)) == pytest.approx(4.0)


def test_grounding_half_covered_cells_use_area_fraction():
    # 64x64 mask, 8x8 grid (cells of 8x8 px). Mask = columns 0..3, all rows: every cell of
    # grid column 0 is half covered, the rest empty. mean(m) = 8 * 0.5 / 64 = 1/16.
    mask = torch.zeros(64, 64, dtype=torch.bool)
    mask[:, :4] = True
    cells = mask_to_grid(mask, (8, 8))
    expected = torch.zeros(8, 8, dtype=torch.float64)
    expected[:, 0] = 0.5
    torch.testing.assert_close(cells, expected)
    torch.testing.assert_close(cells.float(), F.adaptive_avg_pool2d(mask.float()[None, None], (8, 8))[0, 0])
    # All attention on cell (0, 0): mass on lesion 0.5 -> score 0.5 / (1/16) = 8.
    attention = torch.zeros(64)
    attention[0] = 1.0
    assert grounding_score(attention, mask, grid=(8, 8)) == pytest.approx(8.0)


def test_mask_to_grid_non_divisible_is_exact_area():
    # 3x3 mask -> 2x2 grid: cells span 1.5 px. Pixel (0, 0) alone covers 1x1 of the
    # 1.5x1.5 cell (0, 0) -> 4/9; the mask's area fraction 1/9 is preserved by the mean.
    mask = torch.zeros(3, 3)
    mask[0, 0] = 1
    cells = mask_to_grid(mask, (2, 2))
    expected = torch.tensor([[4 / 9, 0.0], [0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(cells, expected)
    assert float(cells.mean()) == pytest.approx(1 / 9)
    # centre pixel: splits into a quarter (0.5x0.5 px) of each cell -> 0.25 / 2.25 = 1/9 each
    mask = torch.zeros(3, 3)
    mask[1, 1] = 1
    torch.testing.assert_close(mask_to_grid(mask, (2, 2)), torch.full((2, 2), 1 / 9, dtype=torch.float64))


def test_grounding_batched_with_empty_mask():
    masks = torch.zeros(3, 64, 64, dtype=torch.bool)
    masks[0] = _quadrant_mask()
    masks[2] = _quadrant_mask()
    attention = torch.full((3, 64), 1 / 64)
    attention[0] = 0
    attention[0].view(8, 8)[:4, :4] = 1 / 16
    scores = grounding_score(attention, masks, grid=(8, 8))
    assert isinstance(scores, torch.Tensor) and scores.shape == (3,)
    assert scores[0].item() == pytest.approx(4.0)
    assert math.isnan(scores[1].item())  # empty mask -> nan
    assert scores[2].item() == pytest.approx(1.0)
    assert mean_grounding_score(scores) == pytest.approx(2.5)  # (4 + 1) / 2, nan skipped
    assert mean_grounding_score([float("nan"), 3.0]) == pytest.approx(3.0)
    assert math.isnan(mean_grounding_score([float("nan")]))
    assert math.isnan(grounding_score(torch.full((64,), 1 / 64), torch.zeros(64, 64), grid=(8, 8)))


def test_grounding_shape_errors():
    with pytest.raises(ValueError):
        grounding_score(torch.ones(63), _quadrant_mask(), grid=(8, 8))
    with pytest.raises(ValueError):
        grounding_score(torch.ones(2, 64), _quadrant_mask(), grid=(8, 8))
    with pytest.raises(ValueError):
        grounding_score(torch.ones(2, 64), torch.ones(3, 64, 64), grid=(8, 8))


# ----------------------------------------------------------------------------- aggregation


def test_vqa_metrics_aggregates_by_type():
    sentence = "There is a small nodule in the left lower lobe."
    records = [
        {"prediction": "Yes, there is.", "reference": "yes", "answer_type": "CLOSED"},
        {"prediction": "normal", "reference": "no", "answer_type": "closed"},
        {"prediction": "upper left", "reference": "left upper quadrant", "answer_type": "OPEN"},
        {"prediction": sentence, "reference": sentence, "answer_type": "report"},
    ]
    out = vqa_metrics(records)
    assert out["n_closed"] == 2 and out["n_open"] == 1 and out["n_report"] == 1
    assert out["closed_accuracy"] == pytest.approx(0.5)
    assert out["open_recall"] == pytest.approx(2 / 3)
    assert out["open_f1"] == pytest.approx(0.8)
    assert out["open_bleu4"] == 0.0  # two tokens: no 4-grams
    assert out["report_bleu4"] == pytest.approx(1.0)
    assert out["report_rouge_l"] == pytest.approx(1.0)
    assert vqa_metrics(records, closed_match="substring")["closed_accuracy"] == pytest.approx(1.0)

    only_closed = vqa_metrics(records[:1])
    assert only_closed["n_open"] == 0 and math.isnan(only_closed["open_recall"])
    assert math.isnan(only_closed["report_rouge_l"])
    with pytest.raises(ValueError):
        vqa_metrics([{"prediction": "a", "reference": "a", "answer_type": "free"}])
