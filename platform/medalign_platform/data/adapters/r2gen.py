"""IU-Xray and MIMIC-CXR report generation in R2Gen's layout.

Layout (``data.source`` is the folder, or ``annotation.json`` itself)::

    annotation.json   {"train": [...], "val": [...], "test": [...]}
                      each {id, report, image_path: ["CXR2384_IM-0942/0.png", ".../1.png"], split}
                      (MIMIC-CXR adds subject_id and study_id)
    images/CXR2384_IM-0942/0.png ...

* released splits kept (R2Gen's ``val`` is the val split);
* ``data.view_policy``: ``first`` (default) makes one sample per study from its first
  image; ``each`` makes one sample per image, every view with the study's report (ids
  ``<id>-v<k>``). Either way the prompt is ``data.report_prompt`` and the answer the
  report, ``answer_type: report``;
* ``id``, ``split``, ``subject_id``, ``study_id``, the view index and the number of views go to ``meta``.
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
    text_field,
)

ANNOTATION = "annotation.json"
SPLIT_KEYS = {"train": "train", "val": "val", "test": "test"}
VIEW_POLICIES = ("first", "each")


def _annotation(source: Source) -> Path:
    assert source.path is not None
    return source.path if source.path.is_file() else source.path / ANNOTATION


def matches(source: Source) -> bool:
    return source.path is not None and _annotation(source).is_file() and _annotation(source).suffix == ".json"


def files(source: Source, context: ReadContext) -> list[Path]:
    return [_annotation(source)]


def _views(record: dict) -> list:
    paths = record.get("image_path")
    if isinstance(paths, str):
        paths = [paths]
    if not isinstance(paths, list) or not paths:
        raise RecordProblem("no image", f"image_path is {paths!r}", "give the study's image files as a list")
    return paths


def read(source: Source, context: ReadContext) -> Release:
    if context.view_policy not in VIEW_POLICIES:
        raise PrepareError(f"data.view_policy={context.view_policy!r}: use 'first' (one sample per study, its "
                           "first image) or 'each' (one sample per image, all with the study's report).")
    if not context.report_prompt or not str(context.report_prompt).strip():
        raise PrepareError("data.report_prompt is empty. Fix: set the instruction the student sees before the "
                           "report, e.g. 'Describe the findings of this chest X-ray.'")
    path = _annotation(source)
    annotation = read_json(path, f"R2Gen's {ANNOTATION}")
    missing = [k for k in SPLIT_KEYS.values() if not isinstance(annotation, dict) or k not in annotation]
    if missing:
        found = sorted(annotation) if isinstance(annotation, dict) else type(annotation).__name__
        raise PrepareError(f"{path}: expected R2Gen's {{'train', 'val', 'test'}} lists, missing {missing} (found "
                           f"{found}). Fix: point data.source at the R2Gen annotation.json of IU-Xray or MIMIC-CXR.")
    root = image_folder(source, context, "images", f"put the images in 'images/' beside {ANNOTATION} (R2Gen's layout)")
    prompt = " ".join(str(context.report_prompt).split())
    samples: list[Sample] = []
    for split, key in SPLIT_KEYS.items():
        records = annotation[key]
        if not isinstance(records, list):
            raise PrepareError(f"{path}: annotation[{key!r}] is a {type(records).__name__}, not a list of studies. "
                               "Fix: re-download the annotation file.")
        for index, record in enumerate(records):
            rid = str(record.get("id", f"#{index}")) if isinstance(record, dict) else f"#{index}"
            ref = RecordRef(f"{path}[{key}]", index, rid)

            def build(record=record, rid=rid, ref=ref, split=split) -> list[Sample]:
                if not isinstance(record, dict):
                    raise RecordProblem("bad record", f"record is a {type(record).__name__}, not an object",
                                        "store each study as a JSON object")
                report = text_field(record, "report")
                views = _views(record)
                images = [confined(root, v) for v in views]
                chosen = images[:1] if context.view_policy == "first" else images
                meta = {k: record[k] for k in ("id", "split", "subject_id", "study_id") if record.get(k) is not None}
                return [
                    Sample(id=f"{context.name}-{rid}" + (f"-v{k}" if context.view_policy == "each" else ""),
                           split=split, image=image, question=prompt, answer=report, answer_type="report",
                           question_type=None, image_id=image, ref=ref, language="en",
                           meta={**meta, "view": k, "n_views": len(views)})
                    for k, image in enumerate(chosen)
                ]

            built = context.guard(ref, build)
            samples.extend(built or [])
    return Release(samples, root)


LAYOUT = Layout("r2gen", f"{ANNOTATION} ({{train, val, test}}) + images/ (R2Gen's layout)", matches, files, read)
