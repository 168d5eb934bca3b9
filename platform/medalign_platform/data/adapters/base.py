"""What every release adapter produces, and the checks the adapters share.

An adapter reads one public release in its own layout (VQA-RAD's OSF JSON, SLAKE's
json + ``imgs/``, a parquet mirror, R2Gen's ``annotation.json`` ...) and returns a
:class:`Release`: one :class:`Sample` per (image, question, answer), tagged with the split
the release puts it in, plus the folder its image paths start from.
:mod:`medalign_platform.data.prepare` then checks images, carves a val split where the
release has none, counts overlaps and duplicates and writes the LLaVA conversation files.

A bad record goes through :meth:`ReadContext.problem`, which raises one
:class:`PrepareError` naming the file, the record and the fix (``on_error="raise"``) or
skips the record and counts it by reason (``on_error="skip"``). Problems with a whole file
or folder (wrong or mixed layout, invalid JSON, pickles) always raise.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..conversations import DatasetError

SPLITS = ("train", "val", "test")
ANSWER_TYPES = ("closed", "open", "report")
SKIP_HINT = "or pass data.on_error=skip to skip and count such records"

# CJK ideographs, kana and hangul: enough to tell SLAKE's Chinese records (and Japanese or
# Korean text) from English. Full-width punctuation alone does not count: it turns up in
# English text pasted from CJK editors.
_NON_ENGLISH = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")


class PrepareError(DatasetError):
    """A release that cannot be prepared; the message names the file, the record and the fix."""


@dataclass(frozen=True)
class RecordRef:
    """Where a record came from, for messages: file, position in it and its id."""

    file: str
    index: int
    rid: str

    def __str__(self) -> str:
        return f"{self.file}: record {self.index} (id={self.rid!r})"


class RecordProblem(Exception):
    """One record cannot be used: ``reason`` is the short category it is counted under."""

    def __init__(self, reason: str, problem: str, fix: str):
        super().__init__(problem)
        self.reason, self.problem, self.fix = reason, problem, fix


@dataclass
class Sample:
    """One (image, question, answer) of a release, before checks and splitting.

    ``image`` and ``mask`` are POSIX paths relative to :attr:`Release.image_root` (already
    confined to it); ``image_id`` names the image for overlap counts and the val carve
    (the release's image name, or the content hash for images stored in parquet).
    """

    id: str
    split: str                      # train | val | test, as released
    image: str
    question: str
    answer: str
    answer_type: str                # closed | open | report
    question_type: str | None
    image_id: str
    ref: RecordRef
    language: str = "en"
    mask: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Release:
    """What an adapter read: samples, where their images start and how answer types were set."""

    samples: list[Sample]
    image_root: Path
    answer_types: str = "released"  # released | inferred
    answer_type_rule: str | None = None
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Source:
    """``data.source``: a local path, or ``hf:<repo id>`` for the ``datasets`` library."""

    text: str
    path: Path | None = None
    hf_repo: str | None = None
    revision: str | None = None

    @classmethod
    def parse(cls, text: Any, revision: str | None = None) -> "Source":
        if not isinstance(text, str) or not text.strip():
            raise PrepareError(f"data.source is not set (got {text!r}). Fix: pass data.source=PATH (the folder "
                               "of the downloaded release) or data.source=hf:<repo id> for a parquet mirror.")
        text = text.strip()
        if text.startswith("hf:"):
            repo = text[3:].strip("/")
            if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
                raise PrepareError(f"data.source={text!r}: expected hf:<owner>/<name> (e.g. hf:flaviagiammarino/vqa-rad)")
            return cls(text, hf_repo=repo, revision=revision)
        path = Path(text).expanduser()
        if not path.exists():
            raise PrepareError(f"data.source={text!r}: no such file or folder (relative paths start at "
                               f"{Path.cwd()}). Fix: point it at the downloaded release.")
        return cls(text, path=path.resolve())

    @property
    def root(self) -> Path:
        """The release folder (a file source's folder)."""
        assert self.path is not None
        return self.path if self.path.is_dir() else self.path.parent


@dataclass
class ReadContext:
    """Settings an adapter reads with, and the record-problem policy."""

    name: str
    language: str = "en"            # en | zh | all
    on_error: str = "raise"         # raise | skip
    image_dir: str | None = None    # overrides the release's own image folder
    view_policy: str = "first"      # reports: first | each
    report_prompt: str = "Describe the findings of this chest X-ray."
    out_dir: Path | None = None     # the stage being written (images extracted from parquet go here)
    skipped: Counter = field(default_factory=Counter)
    skipped_examples: list[str] = field(default_factory=list)
    filtered: Counter = field(default_factory=Counter)

    def problem(self, ref: RecordRef, problem: RecordProblem) -> None:
        """Raises :class:`PrepareError` for ``problem``, or counts it when skipping."""
        if self.on_error != "skip":
            raise PrepareError(f"{ref}: {problem.problem}. Fix: {problem.fix} ({SKIP_HINT}).")
        self.skipped[problem.reason] += 1
        if len(self.skipped_examples) < 20:
            self.skipped_examples.append(f"{ref}: {problem.problem}")

    def filter(self, reason: str) -> None:
        """Counts a record left out by design (e.g. another language than ``data.language``)."""
        self.filtered[reason] += 1

    def guard(self, ref: RecordRef, build: Callable[[], Any]) -> Any:
        """``build()``, or ``None`` after :meth:`problem` when it raises :class:`RecordProblem`."""
        try:
            return build()
        except RecordProblem as problem:
            self.problem(ref, problem)
            return None


def read_json(path: Path, what: str) -> Any:
    """A JSON file, or a :class:`PrepareError` naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise PrepareError(f"{path}: not UTF-8 text ({exc}). Fix: re-download {what}.") from None
    except ValueError as exc:
        raise PrepareError(f"{path}: not valid JSON ({exc}). Fix: re-download {what} (the file is truncated "
                           "or was edited).") from None


def confined(root: Path, rel: Any, what: str = "image") -> str:
    """``rel`` as a normalised POSIX path inside ``root``; refuses escapes.

    Absolute paths, ``..`` that leaves ``root`` and symlinks (anywhere on the way) that
    point outside ``root`` raise :class:`RecordProblem`. The file need not exist.
    """
    if not isinstance(rel, str) or not rel.strip():
        raise RecordProblem(f"no {what} path", f"no {what} path (got {rel!r})",
                            f"give the record its {what} file name, relative to the release's image folder")
    text = rel.strip().replace("\\", "/")
    if text.startswith("/") or re.match(r"^[A-Za-z]:/", text):
        raise RecordProblem(f"{what} outside the dataset root", f"{what} path {rel!r} is absolute",
                            f"give {what} paths relative to the dataset root {root}")
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, text))
    if os.path.commonpath([real, real_root]) != real_root:
        raise RecordProblem(f"{what} outside the dataset root",
                            f"{what} path {rel!r} resolves to {real}, outside the dataset root {real_root}"
                            + (" (through a symlink)" if ".." not in text.split("/") else ""),
                            f"keep every {what} inside {real_root}: copy the file there instead of linking to it")
    return Path(os.path.relpath(real, real_root)).as_posix()


def is_english(*texts: str) -> bool:
    """False when any text holds CJK ideographs, kana or hangul."""
    return not any(_NON_ENGLISH.search(t or "") for t in texts)


def text_field(record: dict, key: str, what: str | None = None) -> str:
    """A record's text field (numbers become text, ``2`` -> ``"2"``); empty or missing raises."""
    value = record.get(key)
    if isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
        raise RecordProblem(f"empty {what or key}", f"field {key!r} is {value!r}",
                            f"fill in the record's {what or key}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = " ".join(str(value).split())
    if not text:
        raise RecordProblem(f"empty {what or key}", f"field {key!r} is empty", f"fill in the record's {what or key}")
    return text


def released_answer_type(value: Any) -> str:
    """``CLOSED``/``OPEN`` in any case and spacing -> ``closed``/``open``; anything else raises."""
    text = str(value).strip().lower() if isinstance(value, str) else None
    if text in ("closed", "open"):
        return text
    raise RecordProblem("unknown answer type", f"answer_type is {value!r}, not CLOSED or OPEN",
                        "set answer_type to CLOSED (yes/no or choice) or OPEN")


YES_NO = frozenset({"yes", "no"})
INFERRED_RULE = "closed when the normalised answer is 'yes' or 'no', else open"


def inferred_answer_type(answer: str) -> str:
    """Closed for yes/no answers, open otherwise (for releases that ship no answer type)."""
    from ..metrics import normalize_answer

    return "closed" if normalize_answer(answer) in YES_NO else "open"


def find_files(root: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Files under ``root`` (recursively, hidden folders skipped) whose name ends with a suffix."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(Path(folder) / f for f in sorted(files) if f.lower().endswith(suffixes))
    return found


PICKLE_SUFFIXES = (".pkl", ".pickle")


def refuse_pickles(source: Source, parquet_hint: str) -> None:
    """A pickled release (PathVQA's question files) is refused, never opened."""
    if source.path is None:
        return
    if source.path.is_file():
        pickles = [source.path] if source.path.name.lower().endswith(PICKLE_SUFFIXES) else []
    else:
        pickles = find_files(source.path, PICKLE_SUFFIXES)
    if pickles and (source.path.is_file() or not find_files(source.path, (".parquet",))):
        shown = ", ".join(str(p) for p in pickles[:3]) + (" ..." if len(pickles) > 3 else "")
        raise PrepareError(f"{shown}: pickled question files. medalign never unpickles files (loading a pickle "
                           f"can run arbitrary code). Fix: use the parquet release instead: {parquet_hint}.")


@dataclass(frozen=True)
class Layout:
    """One on-disk form of a release (e.g. VQA-RAD's OSF JSON, or its parquet mirror).

    ``matches(source)`` says whether ``source`` looks like this layout; ``files(source,
    context)`` lists the annotation files whose size and time fingerprint the prepared
    copy; ``read(source, context)`` returns the :class:`Release`.
    """

    name: str
    describe: str
    matches: Callable[[Source], bool]
    files: Callable[[Source, ReadContext], list[Path]]
    read: Callable[[Source, ReadContext], Release]


def image_folder(source: Source, context: ReadContext, default: str, what: str) -> Path:
    """The folder a release's image paths start from: ``data.image_dir`` or the release's own."""
    rel = context.image_dir or default
    folder = (source.root / rel) if not Path(rel).is_absolute() else Path(rel)
    if not folder.is_dir():
        raise PrepareError(f"{source.root}: no image folder {folder}. Fix: {what}, or set data.image_dir to the "
                           "folder that holds the images.")
    return folder.resolve()
