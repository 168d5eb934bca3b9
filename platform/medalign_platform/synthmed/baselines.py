"""Answer baselines that never look at the image, for every SynthMed table.

* ``always_no``: answer "no" to every closed question.
* ``text_only_prior``: answer each test question with the most common training answer of
  the same question text (closed and open alike), the best a model can do from the
  question alone; falls back to the most common training answer of its answer type for a
  question text never seen in training.
* ``pooled_reader`` (task files only): answer a location-conditioned closed question with
  the answer to "is there a <value> lesion anywhere?", what a reader that looks at the
  whole image but not at the named place gets (recorded per question as
  ``pooled_answer``).

All scores use :mod:`medalign_platform.data.metrics` (exact closed match, open token
recall), on a 0-1 scale.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

from ..data.metrics import closed_accuracy, open_recall

__all__ = ["answer_baselines", "load_records"]


def load_records(path: str | Path) -> list[dict]:
    """``(question, answer, answer_type, record)`` dicts of a LLaVA conversation file."""
    records = json.loads(Path(path).read_text(encoding="utf-8"))
    out = []
    for record in records:
        turns = record["conversations"]
        out.append({"question": turns[0]["value"].replace("<image>", "").strip(), "answer": turns[1]["value"],
                    "answer_type": record.get("answer_type"), "record": record})
    return out


def answer_baselines(train_file: str | Path, test_file: str | Path) -> dict[str, float]:
    """The image-free baselines of ``test_file``'s closed and open questions.

    Returns:
        ``always_no_closed``, ``text_only_closed``, ``text_only_open_recall`` and, when the
        records carry ``pooled_answer``, ``pooled_reader_closed``; plus ``n_closed``,
        ``n_open``.
    """
    train, test = load_records(train_file), load_records(test_file)
    by_question: dict[str, Counter] = defaultdict(Counter)
    by_type: dict[str, Counter] = defaultdict(Counter)
    for item in train:
        by_question[item["question"]][item["answer"]] += 1
        by_type[item["answer_type"]][item["answer"]] += 1

    def prior(item) -> str:
        counts = by_question.get(item["question"]) or by_type.get(item["answer_type"]) or Counter({"no": 1})
        return counts.most_common(1)[0][0]

    closed = [item for item in test if item["answer_type"] == "closed"]
    open_ = [item for item in test if item["answer_type"] == "open"]
    out: dict[str, float] = {"n_closed": len(closed), "n_open": len(open_)}
    if closed:
        references = [item["answer"] for item in closed]
        out["always_no_closed"] = closed_accuracy(["no"] * len(closed), references)
        out["text_only_closed"] = closed_accuracy([prior(item) for item in closed], references)
        if all("pooled_answer" in item["record"] for item in closed):
            out["pooled_reader_closed"] = closed_accuracy([item["record"]["pooled_answer"] for item in closed],
                                                          references)
    if open_:
        out["text_only_open_recall"] = open_recall([prior(item) for item in open_], [item["answer"] for item in open_])
    return out
