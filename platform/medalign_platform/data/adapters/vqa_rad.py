"""VQA-RAD as released on OSF: one JSON list plus one image folder.

Layout (``data.source`` is the folder, or the JSON file itself)::

    VQA_RAD Dataset Public.json     [{qid, phrase_type, image_name, question, answer, answer_type,
                                      question_type, image_organ, ...}, ...]
    VQA_RAD Image Folder/synpic54610.jpg ...

* split: ``phrase_type`` starting with ``test`` (``test_freeform``, ``test_para``) is test,
  ``freeform`` / ``para`` is train; the release has no val split (carved by prepare);
* ``answer_type`` ``CLOSED`` / ``OPEN`` in any case; anything else is an error;
* ``answer`` may be a number in the JSON (``2`` -> ``"2"``);
* ``question_type`` (``PRES``, ``SIZE``, ``PRES, POS`` ...) is kept, lowercased, for the
  per-question-type breakdown; ``image_organ``, ``phrase_type``, ``qid``,
  ``qid_linked_id``, ``evaluation``, ``question_relation`` and ``question_frame`` go to
  ``meta``; ``question_rephrase`` and ``image_case_url`` are dropped.

Train and test questions share images in this release; prepare reports that overlap and
leaves the benchmark as released.
"""

from __future__ import annotations

from pathlib import Path

from .base import (
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
    released_answer_type,
    text_field,
)

JSON_NAME = "VQA_RAD Dataset Public.json"
IMAGE_FOLDER = "VQA_RAD Image Folder"
TRAIN_PHRASES = ("freeform", "para")
META_KEYS = ("qid", "phrase_type", "qid_linked_id", "image_organ", "evaluation", "question_relation",
             "question_frame")


def _json_path(source: Source) -> Path:
    assert source.path is not None
    return source.path if source.path.is_file() else source.path / JSON_NAME


def matches(source: Source) -> bool:
    return source.path is not None and _json_path(source).is_file() and _json_path(source).suffix == ".json"


def files(source: Source, context: ReadContext) -> list[Path]:
    return [_json_path(source)]


def _split(phrase_type) -> str:
    text = str(phrase_type or "").strip().lower()
    if text.startswith("test"):
        return "test"
    if text in TRAIN_PHRASES:
        return "train"
    raise RecordProblem("unknown phrase_type", f"phrase_type is {phrase_type!r}",
                        "use freeform/para (train) or test_freeform/test_para (test)")


def read(source: Source, context: ReadContext) -> Release:
    path = _json_path(source)
    records = read_json(path, "the VQA-RAD JSON from OSF")
    if not isinstance(records, list) or not records:
        raise PrepareError(f"{path}: expected a non-empty JSON list of VQA-RAD records, got "
                           f"{type(records).__name__}. Fix: point data.source at the OSF release folder.")
    dicts = [r for r in records if isinstance(r, dict)]
    if dicts and not any("image_name" in r and "phrase_type" in r for r in dicts):
        raise PrepareError(f"{path}: no record has VQA-RAD's 'image_name' and 'phrase_type' fields (first record's "
                           f"keys: {sorted(dicts[0])[:8]}). Fix: this is not the OSF VQA-RAD JSON; for LLaVA "
                           "conversation files use data=llava_med, for the parquet mirror point at its folder.")
    root = image_folder(source, context, IMAGE_FOLDER, f"unzip the OSF download so that '{IMAGE_FOLDER}' sits "
                        f"beside '{JSON_NAME}'")
    samples: list[Sample] = []
    for index, record in enumerate(records):
        rid = str(record.get("qid", f"#{index}")) if isinstance(record, dict) else f"#{index}"
        ref = RecordRef(str(path), index, rid)

        def build(record=record, ref=ref, rid=rid) -> Sample:
            if not isinstance(record, dict):
                raise RecordProblem("bad record", f"record is a {type(record).__name__}, not an object",
                                    "store each record as a JSON object")
            image = confined(root, record.get("image_name"))
            return Sample(
                id=f"vqa_rad-{rid}", split=_split(record.get("phrase_type")), image=image,
                question=text_field(record, "question"), answer=text_field(record, "answer"),
                answer_type=released_answer_type(record.get("answer_type")),
                question_type=str(record["question_type"]).strip().lower() if record.get("question_type") else None,
                image_id=image, ref=ref, language="en",
                meta={k: record[k] for k in META_KEYS if record.get(k) is not None},
            )

        sample = context.guard(ref, build)
        if sample is not None:
            samples.append(sample)
    return Release(samples, root)


LAYOUT = Layout("osf_json", f"'{JSON_NAME}' + '{IMAGE_FOLDER}/' (the OSF release)", matches, files, read)
