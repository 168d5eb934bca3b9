"""Per-question-type breakdowns stay out of the sweep leaderboard's columns."""

from __future__ import annotations

from medalign_platform.tune.leaderboard import metric_columns


def test_breakdown_keys_are_not_leaderboard_columns():
    records = [{"metrics": {"val/closed_accuracy": 0.7, "val/closed_accuracy_substring": 0.8,
                            "val/by_qtype/pres/closed_accuracy": 0.9, "test/by_qtype/pos/open_recall": 0.4,
                            "test/open_recall": 0.5}}]
    assert metric_columns(["val/closed_accuracy"], records) == [
        "val/closed_accuracy", "val/closed_accuracy_substring", "test/open_recall"]
