"""LLaVA-Med / original-work conversation JSON: the platform's own input format.

These files already load directly (``data.train=/path/train.json`` with the
``llava_med`` data group, as before); preparing them adds what the release adapters give:
confinement of every image path, a val split carved from train by image when there is
none, overlap/duplicate counts and a manifest. Layout (``data.source`` is the folder)::

    train.json (or .jsonl)  [val.json | validation.json]  test.json
        [{"id", "image", "conversations": [{"from": "human", "value": "<image>\\nQ"},
                                             {"from": "gpt", "value": "A"}], "answer_type": "CLOSED"}, ...]
    image paths relative to data.image_dir (default: the folder itself)

Records are parsed by :func:`medalign_platform.data.conversations.load_conversation_dataset`
(``answer_type`` in any case; missing -> closed for yes/no answers, open otherwise; a
multi-turn record gives one sample per question, ids ``<id>#<turn>`` after the first).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from ..conversations import DatasetWarning, load_conversation_dataset
from .base import (
    ANSWER_TYPES,
    Layout,
    PrepareError,
    ReadContext,
    RecordProblem,
    RecordRef,
    Release,
    Sample,
    Source,
    confined,
    image_folder,
    read_json,
)

SPLIT_NAMES = {"train": ("train",), "val": ("val", "validation", "validate"), "test": ("test",)}


def _split_files(source: Source) -> dict[str, Path]:
    assert source.path is not None
    found: dict[str, Path] = {}
    for split, stems in SPLIT_NAMES.items():
        present = [source.root / f"{s}{ext}" for s in stems for ext in (".json", ".jsonl")
                   if (source.root / f"{s}{ext}").is_file()]
        if len(present) > 1:
            raise PrepareError(f"{source.root}: {present[0].name} and {present[1].name} both hold the {split} split "
                               "(a mixed layout). Fix: keep one of them.")
        if present:
            found[split] = present[0]
    return found


def _is_conversation_file(path: Path) -> bool:
    if path.suffix == ".jsonl":
        return True
    records = read_json(path, path.name)
    return isinstance(records, list) and any(isinstance(r, dict) and "conversations" in r for r in records[:50])


def matches(source: Source) -> bool:
    if source.path is None or not source.path.is_dir():
        return False
    found = _split_files(source)
    return "train" in found and "test" in found and _is_conversation_file(found["train"])


def files(source: Source, context: ReadContext) -> list[Path]:
    return list(_split_files(source).values())


def read(source: Source, context: ReadContext) -> Release:
    root = image_folder(source, context, ".", "put the images under the release folder")
    samples: list[Sample] = []
    for split, path in _split_files(source).items():
        with warnings.catch_warnings():  # skipped records are counted below instead
            warnings.simplefilter("ignore", DatasetWarning)
            dataset = load_conversation_dataset(path, root, on_error="skip" if context.on_error == "skip" else "raise",
                                                validate_images=False)
        for index, reason in dataset.skipped:
            context.problem(RecordRef(str(path), index, "?"), RecordProblem("bad record", reason, "fix the record"))
        for item in dataset.items:
            rid = item.id if item.turn == 0 else f"{item.id}#{item.turn}"
            ref = RecordRef(str(path), item.record_index, rid)

            def build(item=item, ref=ref, rid=rid, split=split) -> Sample:
                if item.answer_type not in ANSWER_TYPES:
                    raise RecordProblem("unknown answer type", f"answer_type is {item.answer_type!r}",
                                        "use CLOSED, OPEN (any case) or report")
                image = confined(root, os.path.relpath(item.image_path, root))
                mask = confined(root, os.path.relpath(item.mask_path, root), "mask") if item.mask_path else None
                return Sample(id=rid, split=split, image=image, question=item.question, answer=item.answer,
                              answer_type=item.answer_type, question_type=item.question_type,
                              image_id=item.image_id or image, ref=ref, mask=mask, meta={"turn": item.turn})

            sample = context.guard(ref, build)
            if sample is not None:
                samples.append(sample)
    return Release(samples, root)


LAYOUT = Layout("conversation_json", "train.json + test.json in LLaVA conversation format", matches, files, read)
