"""SLAKE as released (``BoKelvin/SLAKE``): three JSON lists and ``imgs/`` with masks.

Layout (``data.source`` is the folder)::

    train.json  validate.json (or validation.json)  test.json
        [{img_id, img_name: "xmlab1/source.jpg", question, answer, q_lang: en|zh, location,
          modality, answer_type: OPEN|CLOSED, base_type, content_type, triple, qid}, ...]
    imgs/xmlab1/source.jpg  imgs/xmlab1/mask.png  imgs/xmlab1/detection.json  imgs/xmlab1/question.json

* the released train / validation / test splits are kept;
* ``data.language`` (``en`` default, ``zh``, ``all``) keeps the records whose ``q_lang``
  matches; the others are counted as filtered by language, not as errors. A record that
  says ``q_lang: en`` but holds Chinese text is an error (or skipped and counted);
* ``content_type`` (Organ, Position, Abnormality, Modality, ...) becomes the
  ``question_type`` of the per-question-type breakdown; ``location``, ``modality``,
  ``base_type``, ``content_type``, ``q_lang``, ``qid``, ``img_id`` and ``triple`` go to ``meta``;
* ``imgs/xmlabN/mask.png`` (the release's segmentation of the image's organs and lesions)
  becomes the record's ``mask``, used for the grounding score; ``detection.json`` and
  ``question.json`` are not read.
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
    is_english,
    read_json,
    released_answer_type,
    text_field,
)

SPLIT_FILES = {"train": ("train.json",), "val": ("validate.json", "validation.json"), "test": ("test.json",)}
META_KEYS = ("location", "modality", "base_type", "content_type", "q_lang", "qid", "img_id", "triple")
LANGUAGES = ("en", "zh", "all")


def _split_files(source: Source) -> dict[str, Path]:
    assert source.path is not None
    found: dict[str, Path] = {}
    for split, names in SPLIT_FILES.items():
        present = [source.root / n for n in names if (source.root / n).is_file()]
        if len(present) > 1:
            raise PrepareError(f"{source.root}: both {present[0].name} and {present[1].name} are present (a mixed "
                               "layout). Fix: keep the one from the SLAKE release and remove the other.")
        if present:
            found[split] = present[0]
    return found


def matches(source: Source) -> bool:
    if source.path is None or not source.path.is_dir():
        return False
    found = _split_files(source)
    return "train" in found and "test" in found


def files(source: Source, context: ReadContext) -> list[Path]:
    return list(_split_files(source).values())


def read(source: Source, context: ReadContext) -> Release:
    if context.language not in LANGUAGES:
        raise PrepareError(f"data.language={context.language!r}: SLAKE has q_lang 'en' and 'zh'. "
                           f"Fix: use one of {list(LANGUAGES)}.")
    if context.image_dir is None and not (source.root / "imgs").is_dir() and (source.root / "imgs.zip").is_file():
        raise PrepareError(f"{source.root}: imgs.zip is not unzipped. Fix: unzip it there "
                           f"(cd '{source.root}' && unzip imgs.zip) so that imgs/xmlab1/source.jpg exists.")
    root = image_folder(source, context, "imgs", "unzip the release's imgs.zip beside train.json")
    samples: list[Sample] = []
    for split, path in _split_files(source).items():
        records = read_json(path, "SLAKE's " + path.name)
        if not isinstance(records, list):
            raise PrepareError(f"{path}: expected a JSON list of SLAKE records, got {type(records).__name__}. "
                               "Fix: re-download the SLAKE release.")
        dicts = [r for r in records if isinstance(r, dict)]
        if dicts and not any("img_name" in r and "q_lang" in r for r in dicts):
            raise PrepareError(f"{path}: no record has SLAKE's 'img_name' and 'q_lang' fields (first record's keys: "
                               f"{sorted(dicts[0])[:8]}). Fix: this is not the SLAKE release; for LLaVA conversation "
                               "files use data=llava_med.")
        for index, record in enumerate(records):
            rid = str(record.get("qid", f"#{index}")) if isinstance(record, dict) else f"#{index}"
            ref = RecordRef(str(path), index, rid)
            if isinstance(record, dict):
                lang = str(record.get("q_lang", "")).strip().lower()
                if context.language != "all" and lang in LANGUAGES and lang != context.language:
                    context.filter(f"q_lang={lang} (data.language={context.language})")
                    continue

            def build(record=record, ref=ref, rid=rid, split=split) -> Sample:
                if not isinstance(record, dict):
                    raise RecordProblem("bad record", f"record is a {type(record).__name__}, not an object",
                                        "store each record as a JSON object")
                lang = str(record.get("q_lang", "")).strip().lower()
                if lang not in ("en", "zh"):
                    raise RecordProblem("unknown language", f"q_lang is {record.get('q_lang')!r}, not 'en' or 'zh'",
                                        "set q_lang to en or zh")
                question, answer = text_field(record, "question"), text_field(record, "answer")
                if lang == "en" and not is_english(question, answer):
                    raise RecordProblem("non-English text", f"q_lang is 'en' but the text is not English "
                                        f"(question {question!r}, answer {answer!r})",
                                        "set q_lang to 'zh' for this record, or fix its text")
                image = confined(root, record.get("img_name"))
                mask = confined(root, str(Path(image).parent / "mask.png"), "mask")
                content = record.get("content_type")
                return Sample(
                    id=f"slake-{rid}", split=split, image=image, question=question, answer=answer,
                    answer_type=released_answer_type(record.get("answer_type")),
                    question_type=str(content).strip().lower() if content else None,
                    image_id=image, ref=ref, language=lang, mask=mask if (root / mask).is_file() else None,
                    meta={k: record[k] for k in META_KEYS if record.get(k) is not None},
                )

            sample = context.guard(ref, build)
            if sample is not None:
                samples.append(sample)
    return Release(samples, root)


LAYOUT = Layout("slake_json", "train.json, validate.json, test.json + imgs/xmlabN/ (the SLAKE release)",
                matches, files, read)
