"""Evaluation as the original work reports it: substring rule side by side, BLEU-1..4, breakdowns."""

from __future__ import annotations

import sys
import types

import pytest

from medalign_platform.data.metrics import bleu4, bleu_n, evaluation_metrics, radgraph_f1


def test_bleu_n_hand_values():
    # unigrams 3/4, bigrams 2/3, trigrams 1/2, 4-grams 0/1 (exp smoothing: 1/2); same length, no penalty
    pred, ref = ["left lung base opacity"], ["left lung base effusion"]
    assert bleu_n(pred, ref, 1) == pytest.approx(0.75, abs=1e-4)
    assert bleu_n(pred, ref, 2) == pytest.approx((0.75 * 2 / 3) ** 0.5, abs=1e-4)
    assert bleu_n(pred, ref, 3) == pytest.approx((0.75 * 2 / 3 * 0.5) ** (1 / 3), abs=1e-4)
    assert bleu_n(pred, ref, 4) == pytest.approx((0.75 * 2 / 3 * 0.5 * 0.5) ** 0.25, abs=1e-4)
    assert bleu_n(pred, ref, 4) == bleu4(pred, ref)
    # brevity penalty: 3 of 5 reference tokens (articles dropped by normalisation), all matching
    assert bleu_n(["the heart is normal"], ["heart is normal in size"], 1) == pytest.approx(
        2.718281828 ** (1 - 5 / 3), abs=1e-4)
    with pytest.raises(ValueError, match="n must be 1..4"):
        bleu_n(pred, ref, 5)


RECORDS = [
    {"prediction": "normal", "reference": "no", "answer_type": "CLOSED", "question_type": "PRES"},
    {"prediction": "Yes.", "reference": "yes", "answer_type": "closed", "question_type": "Size, Pres"},
    {"prediction": "left lung", "reference": "left lung base", "answer_type": "open", "question_type": "POS"},
    {"prediction": "ct", "reference": "mri", "answer_type": "open", "question_type": "modality"},
    {"prediction": "the heart is normal", "reference": "heart is normal in size", "answer_type": "report"},
]


def test_evaluation_metrics_report_the_original_rule_side_by_side_and_break_down_by_question_type():
    out = evaluation_metrics(RECORDS)
    assert out["closed_accuracy"] == 0.5                  # exact: "normal" is not "no"
    assert out["closed_accuracy_substring"] == 1.0        # the original rule: "no" is inside "normal"
    assert out["open_recall"] == pytest.approx((2 / 3 + 0) / 2)
    assert out["n_closed"] == 2 and out["n_open"] == 2 and out["n_report"] == 1
    assert out["by_qtype/pres/closed_accuracy"] == 0.0 and out["by_qtype/pres/n_closed"] == 1
    assert out["by_qtype/size_pres/closed_accuracy"] == 1.0
    assert out["by_qtype/pos/open_recall"] == pytest.approx(2 / 3)
    assert out["by_qtype/pos/open_f1"] == pytest.approx(0.8)
    assert out["by_qtype/modality/open_recall"] == 0.0 and out["by_qtype/modality/n_open"] == 1
    assert "by_qtype/pos/closed_accuracy" not in out      # no closed question of that type: left out, not nan
    assert out["report_bleu1"] == pytest.approx(2.718281828 ** (1 - 5 / 3), abs=1e-4)
    assert out["report_bleu4"] == bleu4(["the heart is normal"], ["heart is normal in size"])
    assert 0 < out["report_rouge_l"] < 1
    assert "report_radgraph_f1" not in out


def test_radgraph_is_an_optional_extra_with_clear_errors(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "radgraph", None)    # not installed
    with pytest.raises(RuntimeError, match="'radgraph' package is not installed. Fix: pip install radgraph"):
        evaluation_metrics(RECORDS, radgraph_model=str(tmp_path))
    monkeypatch.setitem(sys.modules, "radgraph", types.SimpleNamespace(F1RadGraph=object))
    with pytest.raises(FileNotFoundError, match="data.radgraph_model='/nowhere' is not a folder"):
        radgraph_f1(["a"], ["b"], "/nowhere")
    assert "report_radgraph_f1" not in evaluation_metrics(RECORDS[:4], radgraph_model="/nowhere")  # no reports
