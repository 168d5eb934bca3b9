"""SynthMed's measuring tools: the image-free answer baselines and the linear probe."""

from __future__ import annotations

import json

import pytest
import torch

from medalign_platform.synthmed.baselines import answer_baselines
from medalign_platform.synthmed.probes import _quadrant_cells, fit_probe


def _record(question: str, answer: str, kind: str, **extra) -> dict:
    return {"conversations": [{"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": answer}],
            "answer_type": kind, **extra}


def test_answer_baselines_score_what_a_reader_without_the_image_gets(tmp_path):
    train = [_record("q1?", "yes", "closed"), _record("q1?", "yes", "closed"), _record("q1?", "no", "closed"),
             _record("q2?", "no", "closed"), _record("what size?", "small", "open"),
             _record("what size?", "small", "open"), _record("what size?", "large", "open")]
    test = [_record("q1?", "yes", "closed", pooled_answer="yes"), _record("q1?", "no", "closed", pooled_answer="yes"),
            _record("q2?", "no", "closed", pooled_answer="no"), _record("q3?", "yes", "closed", pooled_answer="yes"),
            _record("what size?", "small", "open"), _record("what size?", "large", "open")]
    (tmp_path / "train.json").write_text(json.dumps(train))
    (tmp_path / "test.json").write_text(json.dumps(test))
    out = answer_baselines(tmp_path / "train.json", tmp_path / "test.json")
    assert out["n_closed"] == 4 and out["n_open"] == 2
    assert out["always_no_closed"] == pytest.approx(0.5)
    # q1 -> "yes" (2 of 3), q2 -> "no", the unseen q3 -> the commonest closed train answer (a 2-2 tie: the first
    # seen, "yes"): right on 3 of 4.
    assert out["text_only_closed"] == pytest.approx(3 / 4)
    assert out["text_only_open_recall"] == pytest.approx(0.5)
    assert out["pooled_reader_closed"] == pytest.approx(3 / 4)


def test_quadrant_cells_split_the_grid_into_four_disjoint_quarters():
    cells = _quadrant_cells(8)
    assert [len(c) for c in cells.values()] == [16, 16, 16, 16]
    assert sorted(sum(cells.values(), [])) == list(range(64))
    assert 0 in cells["left upper"] and 7 in cells["right upper"] and 56 in cells["left lower"]
    assert 63 in cells["right lower"]


def test_linear_probe_reads_a_linear_signal_and_not_noise():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 20, generator=generator)
    y = (x[:, 3] + 0.5 * x[:, 7] > 0).long()
    assert fit_probe(x[:1500], y[:1500], x[1500:], y[1500:], l2=0.01) >= 0.95
    noise = torch.randint(0, 2, (2000,), generator=generator)
    assert 0.4 < fit_probe(x[:1500], noise[:1500], x[1500:], noise[1500:]) < 0.6


def test_linear_probe_reads_an_ordinal_count_of_linear_signals():
    # The count probe's case: the class is a sum of binary facts, each linear in the
    # features. (The earlier probe, least squares on one-hot targets, read 0.48 here.)
    generator = torch.Generator().manual_seed(1)
    facts = (torch.rand(2000, 3, generator=generator) < 0.5).float()
    x = 0.1 * torch.randn(2000, 40, generator=generator)
    x[:, [0, 5, 9]] += facts
    y = facts.sum(1).long()
    assert fit_probe(x[:1500], y[:1500], x[1500:], y[1500:]) >= 0.85   # measured 0.894
    shuffled = y[torch.randperm(2000, generator=generator)]
    assert fit_probe(x[:1500], shuffled[:1500], x[1500:], shuffled[1500:]) < 0.5
