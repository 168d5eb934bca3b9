"""Parquet mirrors (PathVQA, VQA-RAD, SLAKE-English), read with the ``datasets`` library.

``data.source`` is ``hf:<repo id>`` (e.g. ``hf:flaviagiammarino/path-vqa``; needs network,
``data.revision`` pins a commit) or a local folder of the mirror's parquet files, e.g. as
``huggingface-cli download --repo-type dataset`` leaves it::

    data/train-00000-of-00001.parquet  data/validation-...parquet  data/test-...parquet

Columns: ``image`` (an image struct ``{bytes, path}``, raw bytes, or a path relative to the
folder), ``question``, ``answer``; an ``answer_type`` or ``question_type`` column is used
when present. The split of a local file is the first of ``train``, ``validation`` /
``valid`` / ``val`` / ``dev``, ``test`` among the words of its path.

Images are stored inside the parquet files, so prepare writes each distinct image once,
named by its content hash (``images/ab/abcdef....jpg``), into the prepared folder; that
hash is the image's identity for overlap counts and the val carve. Without an
``answer_type`` column, closed/open is inferred (yes/no answers are closed) and the
manifest records the rule and the counts. Files are streamed (``streaming=True``), so
nothing is copied into the ``datasets`` cache.
"""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path
from typing import Any

from PIL import Image

from .base import (
    INFERRED_RULE,
    Layout,
    PrepareError,
    ReadContext,
    RecordProblem,
    RecordRef,
    Release,
    Sample,
    Source,
    confined,
    find_files,
    inferred_answer_type,
    is_english,
    released_answer_type,
    text_field,
)

SPLIT_WORDS = {"train": "train", "training": "train", "validation": "val", "valid": "val", "val": "val",
               "dev": "val", "test": "test", "testing": "test"}
REQUIRED_COLUMNS = ("image", "question", "answer")
_FORMAT_SUFFIX = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "BMP": "bmp", "TIFF": "tif", "WEBP": "webp"}


def matches(source: Source) -> bool:
    if source.hf_repo is not None:
        return True
    return source.path is not None and source.path.is_dir() and bool(find_files(source.path, (".parquet",)))


def files(source: Source, context: ReadContext) -> list[Path]:
    return [] if source.path is None else find_files(source.root, (".parquet",))


def split_of(relative: str) -> str | None:
    """The split a parquet file belongs to, from the words of its relative path."""
    for word in re.split(r"[\\/_.\-\s]+", relative.lower()):
        if word in SPLIT_WORDS:
            return SPLIT_WORDS[word]
    return None


def _load(source: Source, context: ReadContext):
    """``{split: IterableDataset}`` (images not decoded)."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - a dependency of the project
        raise PrepareError("the parquet route needs the 'datasets' package. Fix: pip install -e . "
                           "(it is a dependency in pyproject.toml).") from None
    if source.hf_repo is not None:
        try:
            loaded = datasets.load_dataset(source.hf_repo, revision=source.revision, streaming=True)
        except Exception as exc:  # DatasetNotFoundError, ConnectionError, offline mode ...
            raise PrepareError(f"data.source={source.text}: the datasets library could not open it "
                               f"({type(exc).__name__}: {exc}). Fix: check the repo id and network access, or "
                               "download the parquet files and pass their folder as data.source.") from None
        named = {}
        for name, split in loaded.items():
            mapped = SPLIT_WORDS.get(name.lower())
            if mapped is None:
                context.filter(f"split {name!r} (not train/validation/test)")
                continue
            named[mapped] = split
        return named
    by_split: dict[str, list[str]] = {}
    for path in files(source, context):
        split = split_of(path.relative_to(source.root).as_posix())
        if split is None:
            raise PrepareError(f"{path}: cannot tell which split this parquet file holds. Fix: name it after its "
                               "split (train-*.parquet, validation-*.parquet, test-*.parquet) as the mirrors do.")
        by_split.setdefault(split, []).append(str(path))
    try:
        loaded = datasets.load_dataset("parquet", data_files=by_split, streaming=True)
    except Exception as exc:
        raise PrepareError(f"{source.root}: the datasets library could not read the parquet files "
                           f"({type(exc).__name__}: {exc}). Fix: re-download them.") from None
    return dict(loaded.items())


def _undecoded(split, where: str):
    """The split with its ``image`` column left as bytes/path (no PIL decoding)."""
    import datasets

    features = split.features
    if features is not None:
        missing = [c for c in REQUIRED_COLUMNS if c not in features]
        if missing:
            raise PrepareError(f"{where}: no column(s) {missing} (columns: {sorted(features)}). Fix: this is not a "
                               "Med-VQA parquet mirror with image, question and answer columns.")
        if isinstance(features["image"], datasets.Image):
            split = split.cast_column("image", datasets.Image(decode=False))
    return split


def _image_bytes(value: Any, source: Source) -> bytes:
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, Image.Image):
        buffer = io.BytesIO()
        value.save(buffer, format=value.format or "PNG")
        return buffer.getvalue()
    if isinstance(value, str) and value.strip():
        if source.path is None:
            raise RecordProblem("missing image", f"image is a path ({value!r}) but the source is on the hub",
                                "use a mirror that stores image bytes, or download it and pass its folder")
        rel = confined(source.root, value)
        path = source.root / rel
        if not path.is_file():
            raise RecordProblem("missing image", f"image file not found: {path}", "restore the file or re-download")
        return path.read_bytes()
    raise RecordProblem("missing image", f"image is {type(value).__name__} {str(value)[:40]!r}",
                        "store the image as bytes or as a path relative to the parquet folder")


class _ImageWriter:
    """Writes each distinct image once into ``<out>/images/``, named by its SHA-256."""

    def __init__(self, out_dir: Path):
        self.root = out_dir
        self.names: dict[str, str] = {}

    def __call__(self, data: bytes) -> tuple[str, str]:
        digest = hashlib.sha256(data).hexdigest()
        if digest not in self.names:
            try:
                with Image.open(io.BytesIO(data)) as im:
                    im.verify()
                with Image.open(io.BytesIO(data)) as im:
                    im.load()
                    fmt = im.format
            except Exception as exc:
                raise RecordProblem("unreadable image", f"its image bytes do not decode ({type(exc).__name__}: {exc})",
                                    "re-download the parquet file (it is truncated or corrupt)") from None
            rel = f"images/{digest[:2]}/{digest[:24]}.{_FORMAT_SUFFIX.get(fmt or '', 'img')}"
            (self.root / rel).parent.mkdir(parents=True, exist_ok=True)
            (self.root / rel).write_bytes(data)
            self.names[digest] = rel
        return self.names[digest], digest[:24]


def read(source: Source, context: ReadContext) -> Release:
    assert context.out_dir is not None, "the parquet layout writes images into the stage being built"
    splits = _load(source, context)
    if not splits:
        raise PrepareError(f"data.source={source.text}: no train/validation/test split found. Fix: point at the "
                           "mirror's folder of parquet files.")
    writer = _ImageWriter(context.out_dir)
    samples: list[Sample] = []
    inferred = released = 0
    for split_name, split in splits.items():
        where = f"{source.text} [{split_name}]"
        split = _undecoded(split, where)
        for index, row in enumerate(split):
            rid = f"{split_name}-{index}"
            ref = RecordRef(where, index, rid)
            if index == 0:
                missing = [c for c in REQUIRED_COLUMNS if c not in row]
                if missing:
                    raise PrepareError(f"{where}: no column(s) {missing} (columns: {sorted(row)}). Fix: this is not "
                                       "a Med-VQA parquet mirror with image, question and answer columns.")

            def build(row=row, ref=ref, rid=rid, split_name=split_name) -> Sample:
                question, answer = text_field(row, "question"), text_field(row, "answer")
                english = is_english(question, answer)
                if context.language == "en" and not english:
                    raise RecordProblem("non-English text", f"the text is not English (question {question!r})",
                                        "use data.language=all to keep it, or remove the record")
                image, image_id = writer(_image_bytes(row.get("image"), source))
                kind = row.get("answer_type")
                qtype = row.get("question_type")
                return Sample(
                    id=f"{context.name}-{rid}", split=split_name, image=image, question=question, answer=answer,
                    answer_type=released_answer_type(kind) if kind is not None else inferred_answer_type(answer),
                    question_type=str(qtype).strip().lower() if qtype else None, image_id=image_id, ref=ref,
                    language="en" if english else "other",
                    meta={"row": index, **({"answer_type": kind} if kind is not None else {})},
                )

            if context.language == "zh" and is_english(str(row.get("question", "")), str(row.get("answer", ""))):
                context.filter(f"English text (data.language={context.language})")
                continue
            sample = context.guard(ref, build)
            if sample is not None:
                samples.append(sample)
                if "answer_type" in sample.meta:
                    released += 1
                else:
                    inferred += 1
    answer_types = "inferred" if inferred and not released else "released" if released and not inferred else "mixed"
    return Release(samples, context.out_dir, answer_types=answer_types,
                   answer_type_rule=INFERRED_RULE if inferred else None)


LAYOUT = Layout("parquet", "a folder of parquet files (train-*.parquet, test-*.parquet ...) or hf:<repo id>",
                matches, files, read)
