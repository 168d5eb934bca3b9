"""One loader for LLaVA-style conversation datasets: Med-VQA and report generation.

The format is the one LLaVA / LLaVA-Med training files use (VQA-RAD, SLAKE, PathVQA
converted by LLaVA-Med, IU-Xray report files, and SynthMed): a JSON list (or JSON Lines,
one record per line) of records such as::

    {"id": "...", "image": "images/x.png",
     "conversations": [{"from": "human", "value": "<image>\\nis there a lesion?"},
                       {"from": "gpt", "value": "yes"}],
     "answer_type": "closed", "question_type": "presence", "mask": "masks/x.png"}

* ``image`` (and the optional ``mask``) are absolute or relative to ``image_root``; when
  not found there (or when no ``image_root`` is given) relative to the JSON's folder.
  Every path must stay inside one of those two roots: ``../../x.png`` or ``/etc/hostname``
  is a bad record ("leaves the dataset root"), never opened. The check is on the path as
  written (``..`` and absolute paths); a symlink that the dataset's owner placed inside a
  root is followed.
* ``conversations`` may hold several turns: every human turn followed by a gpt turn is
  one (question, answer) item, so a record can yield several items. ``"user"`` /
  ``"assistant"`` roles and ``{"role", "content"}`` turns are accepted; ``system`` turns
  are ignored. In report datasets the gpt value is simply the report.
* ``"<image>"`` is stripped from the question; where it was (``"start"``, ``"end"``,
  ``"middle"`` or ``None``) is kept as ``image_token`` and the original text as
  ``raw_question``, so a prompt builder can put it back.
* ``answer_type`` is lowercased (``"CLOSED"`` -> ``"closed"``); when absent it is
  ``"closed"`` for yes/no answers and ``"open"`` otherwise (or ``default_answer_type``).

Every record is validated up front (image present and fully decodable, mask likewise and
of the image's size, conversation well formed). A bad record raises :class:`DatasetError`
naming the JSON file, the record index and id, the image path and the fix; with
``on_error="skip"`` bad records are skipped, listed in ``dataset.skipped`` as
``(index, reason)`` and summarised in one :class:`DatasetWarning`.
"""

from __future__ import annotations

import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ..common.errors import MedAlignError, image_read_error

__all__ = [
    "ConversationDataset",
    "ConversationItem",
    "DatasetError",
    "DatasetWarning",
    "load_conversation_dataset",
    "read_mask",
]

IMAGE_TOKEN = "<image>"
_HUMAN_ROLES = {"human", "user"}
_GPT_ROLES = {"gpt", "assistant", "model", "bot"}
_SYSTEM_ROLES = {"system"}
_SKIP_HINT = " (or pass on_error='skip' to skip bad records)"


class DatasetError(MedAlignError, ValueError):
    """A dataset file or record that cannot be used; the message says where and how to fix it."""


class DatasetWarning(UserWarning):
    """Records were skipped while loading a dataset with ``on_error="skip"``."""


@dataclass(frozen=True)
class ConversationItem:
    """One (question, answer) pair of one record; the image is loaded on access."""

    id: str
    turn: int                      # index of this pair within its record's conversation
    record_index: int              # position of the record in the JSON file
    image_path: Path
    question: str                  # "<image>" removed, stripped
    answer: str
    answer_type: str               # "closed" | "open" | "report" | whatever the file says (lowercase)
    question_type: str | None
    mask_path: Path | None
    image_token: str | None        # where "<image>" was in raw_question: "start" | "end" | "middle" | None
    raw_question: str
    image_id: str | None = None


class _RecordProblem(Exception):
    def __init__(self, problem: str, fix: str):
        super().__init__(problem)
        self.problem, self.fix = problem, fix


class ConversationDataset(Dataset):
    """A torch ``Dataset`` of (image, question, answer) items built from conversation records.

    ``dataset[i]`` is a dict: ``image`` (PIL RGB), ``mask`` (numpy bool ``[H, W]`` or
    ``None``), ``question``, ``answer``, ``answer_type``, ``question_type``, ``id``,
    ``turn``, ``image_id``, ``image_path``, ``mask_path`` (str or ``None``),
    ``image_token`` and ``raw_question``. PIL images do not go through torch's default
    collate; batch with a collate function of your own (e.g. a processor call).
    """

    def __init__(self, items: list[ConversationItem], *, json_path: Path, image_root: Path | None,
                 num_records: int, skipped: list[tuple[int, str]]):
        self.items = items
        self.json_path = json_path
        self.image_root = image_root
        self.num_records = num_records
        self.skipped = skipped

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        try:
            with Image.open(item.image_path) as im:
                image = im.convert("RGB")
        except (OSError, SyntaxError, ValueError) as error:  # truncated or not an image (validate_images=false)
            raise image_read_error(item.image_path, error) from error
        return {
            "id": item.id,
            "turn": item.turn,
            "image_id": item.image_id,
            "image": image,
            "image_path": str(item.image_path),
            "question": item.question,
            "answer": item.answer,
            "answer_type": item.answer_type,
            "question_type": item.question_type,
            "mask": read_mask(item.mask_path) if item.mask_path is not None else None,
            "mask_path": str(item.mask_path) if item.mask_path is not None else None,
            "image_token": item.image_token,
            "raw_question": item.raw_question,
        }

    def __repr__(self) -> str:
        return (f"ConversationDataset({str(self.json_path)!r}, items={len(self)}, records={self.num_records}, "
                f"skipped={len(self.skipped)})")


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """A mask file as a bool ``[H, W]`` array: any non-zero value (any channel) is foreground."""
    try:
        with Image.open(path) as im:
            arr = np.asarray(im)
    except (OSError, SyntaxError, ValueError) as error:
        raise image_read_error(path, error) from error
    return arr.any(axis=-1) if arr.ndim == 3 else arr != 0


def _check_image(path: Path) -> tuple[str | None, tuple[int, int] | None]:
    """(problem or None, size) after opening and fully decoding the file."""
    if not path.is_file():
        return f"image file not found: {path}", None
    try:
        with Image.open(path) as im:       # structure and checksums (catches truncation even when
            im.verify()                    # ImageFile.LOAD_TRUNCATED_IMAGES is set elsewhere)
        with Image.open(path) as im:
            im.load()                      # full decode
            size = im.size
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return f"unreadable image {path} ({type(exc).__name__}: {exc})", None
    if size[0] == 0 or size[1] == 0:
        return f"empty image {path} (size {size})", None
    return None, size


def _read_records(json_path: Path) -> list:
    if not json_path.is_file():
        raise DatasetError(f"{json_path}: dataset file not found. Fix: check the path (relative paths are "
                           f"relative to the working directory {Path.cwd()}).")
    text = json_path.read_text(encoding="utf-8")
    if json_path.suffix == ".jsonl":
        records: list = []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError as exc:
                records.append(_RecordProblem(f"line {line_no} is not valid JSON ({exc})",
                                              "repair or remove that line"))
        return records
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise DatasetError(f"{json_path}: not valid JSON ({exc}). Fix: repair the file, or name it *.jsonl "
                           "if it holds one JSON record per line.") from None
    if isinstance(data, dict):            # {"data": [...]} / {"annotations": [...]} wrappers
        for key in ("data", "annotations", "records"):
            if isinstance(data.get(key), list):
                data = data[key]
                break
    if not isinstance(data, list):
        raise DatasetError(f"{json_path}: expected a JSON list of records, got {type(data).__name__}. "
                           "Fix: store the records as a list (LLaVA conversation format).")
    return data


def _split_image_token(value: str) -> tuple[str, str | None]:
    idx = value.find(IMAGE_TOKEN)
    if idx < 0:
        return value.strip(), None
    before, after = value[:idx].strip(), value[idx + len(IMAGE_TOKEN):].replace(IMAGE_TOKEN, " ").strip()
    position = "start" if not before else "end" if not after else "middle"
    return " ".join(part for part in (before, after) if part), position


def _turns(record: dict) -> list[tuple[str, str]]:
    conversation = record.get("conversations", record.get("messages"))
    if conversation is None or conversation == []:
        raise _RecordProblem("empty conversation (no 'conversations' turns)",
                             "add a human turn with the question and a gpt turn with the answer")
    if not isinstance(conversation, list):
        raise _RecordProblem(f"'conversations' is a {type(conversation).__name__}, not a list of turns",
                             "store the turns as a list of {'from': ..., 'value': ...}")
    turns = []
    for t, turn in enumerate(conversation):
        if not isinstance(turn, dict):
            raise _RecordProblem(f"turn {t} is a {type(turn).__name__}, not an object",
                                 "write each turn as {'from': 'human'|'gpt', 'value': text}")
        role = str(turn.get("from", turn.get("role", ""))).lower()
        value = turn.get("value", turn.get("content"))
        if role in _SYSTEM_ROLES:
            continue
        if role not in _HUMAN_ROLES | _GPT_ROLES:
            raise _RecordProblem(f"turn {t} has unknown speaker {role!r}",
                                 "use 'human' (or 'user') and 'gpt' (or 'assistant')")
        if value is not None and not isinstance(value, str):
            raise _RecordProblem(f"turn {t} value is a {type(value).__name__}, not text", "store the text as a string")
        turns.append(("human" if role in _HUMAN_ROLES else "gpt", value or ""))
    if not turns:
        raise _RecordProblem("empty conversation (only system turns)", "add a human and a gpt turn")
    return turns


def _pairs(turns: list[tuple[str, str]]) -> list[tuple[str, str]]:
    pairs, question = [], None
    for t, (role, value) in enumerate(turns):
        if role == "human":
            if question is not None:
                raise _RecordProblem(f"missing answer: human turn {t - 1} has no gpt turn after it",
                                     "add the gpt answer after each human question")
            question = value
        else:
            if question is None:
                raise _RecordProblem(f"missing human turn before gpt turn {t}",
                                     "add the human question (with '<image>') before the answer")
            if not value.strip():
                raise _RecordProblem(f"missing answer: gpt turn {t} is empty", "fill in the answer text")
            pairs.append((question, value))
            question = None
    if question is not None:
        raise _RecordProblem("missing answer: the last human turn has no gpt turn",
                             "add the gpt answer (or drop the unanswered question)")
    return pairs


def _resolve(rel: Any, image_root: Path | None, json_dir: Path, what: str) -> Path:
    if not isinstance(rel, str) or not rel.strip():
        raise _RecordProblem(f"no {what} path (field {what!r} is {rel!r})",
                             f"set {what!r} to a file path relative to the image root or the JSON's folder")
    path = Path(rel)
    roots = ([image_root] if image_root is not None else []) + [json_dir]
    if path.is_absolute():
        if not any(_inside(path, root) for root in roots):
            raise _outside(rel, what, roots)
        return path
    candidates = [root / path for root in roots if _inside(root / path, root)]
    if not candidates:
        raise _outside(rel, what, roots)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return candidates[0]


def _inside(path: Path, root: Path) -> bool:
    """Whether ``path``, with ``..`` resolved as written (symlinks not followed), lies inside ``root``."""
    normal, base = os.path.normpath(os.path.abspath(path)), os.path.normpath(os.path.abspath(root))
    return os.path.commonpath([normal, base]) == base


def _outside(rel: str, what: str, roots: list[Path]) -> _RecordProblem:
    shown = " or ".join(dict.fromkeys(str(root) for root in roots))  # once when image_root is the JSON folder
    return _RecordProblem(f"{what} path {rel!r} leaves the dataset root ({shown})",
                          f"give {what} paths inside image_root or the JSON's folder (relative, without '..')")


def load_conversation_dataset(
    json_path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    *,
    on_error: Literal["raise", "skip"] = "raise",
    default_answer_type: str | None = None,
    validate_images: bool = True,
) -> ConversationDataset:
    """Load and validate a LLaVA conversation dataset (JSON list or JSON Lines).

    ``image_root``: folder the ``image``/``mask`` paths are relative to (default: the JSON
    file's folder, which is also tried when a path is not found under ``image_root``).
    ``on_error``: ``"raise"`` (default) raises :class:`DatasetError` on the first bad
    record; ``"skip"`` drops bad records, lists them in ``dataset.skipped`` and warns once.
    ``validate_images=False`` skips decoding (file existence is still checked).
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    json_path = Path(json_path).resolve()
    root = Path(image_root).resolve() if image_root is not None else None
    if root is not None and not root.is_dir():
        raise DatasetError(f"{json_path}: image_root {root} is not a directory. Fix: pass the folder that holds "
                           "the images (or None to use the JSON's folder).")
    records = _read_records(json_path)
    if not records:
        raise DatasetError(f"{json_path}: no records. Fix: point at a non-empty dataset file.")

    # Pass 1: structure and paths (resolved once per distinct path string).
    cache: dict[tuple[str, Any], Path] = {}

    def resolve(rel: Any, what: str) -> Path:
        key = (what, rel if isinstance(rel, str) else repr(rel))
        if key not in cache:
            cache[key] = _resolve(rel, root, json_path.parent, what)
        return cache[key]

    parsed: list[tuple[int, str, Path | None, Any]] = []   # (index, id, image path, pairs-or-problem)
    for index, record in enumerate(records):
        rid, image_path = f"#{index}", None
        try:
            if isinstance(record, _RecordProblem):
                raise record
            if not isinstance(record, dict):
                raise _RecordProblem(f"record is a {type(record).__name__}, not an object",
                                     "store each record as a JSON object")
            rid = str(record.get("id", record.get("question_id", f"#{index}")))
            image_path = resolve(record.get("image"), "image")
            mask_path = (resolve(record["mask"], "mask")
                         if record.get("mask") is not None else None)
            pairs = _pairs(_turns(record))
            parsed.append((index, rid, image_path, (record, pairs, mask_path)))
        except _RecordProblem as problem:
            parsed.append((index, rid, image_path, problem))

    # Pass 2: decode every distinct image and mask once (threads: PIL releases the GIL in zlib/IO).
    files: set[Path] = set()
    for _, _, image_path, payload in parsed:
        if not isinstance(payload, _RecordProblem):
            files.add(image_path)
            if payload[2] is not None:
                files.add(payload[2])
    ordered = sorted(files)
    if validate_images:
        workers = min(8, (os.cpu_count() or 1) * 2) if len(ordered) > 256 else 1
        if workers > 1:
            with ThreadPoolExecutor(workers) as pool:
                checks = dict(zip(ordered, pool.map(_check_image, ordered)))
        else:
            checks = {path: _check_image(path) for path in ordered}
    else:
        checks = {path: ((None, None) if path.is_file() else (f"image file not found: {path}", None))
                  for path in ordered}

    items: list[ConversationItem] = []
    skipped: list[tuple[int, str]] = []
    for index, rid, image_path, payload in parsed:
        try:
            if isinstance(payload, _RecordProblem):
                raise payload
            record, pairs, mask_path = payload
            problem, size = checks[image_path]
            if problem:
                raise _RecordProblem(problem, _image_fix(image_path, root, json_path, problem))
            if mask_path is not None:
                mask_problem, mask_size = checks[mask_path]
                if mask_problem:
                    raise _RecordProblem("mask: " + mask_problem, _image_fix(mask_path, root, json_path, mask_problem))
                if size is not None and mask_size is not None and mask_size != size:
                    raise _RecordProblem(f"mask {mask_path} is {mask_size[0]}x{mask_size[1]} but the image is "
                                         f"{size[0]}x{size[1]}", "regenerate the mask at the image's size")
            items.extend(_items(index, rid, record, pairs, image_path, mask_path, default_answer_type))
        except _RecordProblem as problem:
            where = f"{json_path}: record {index} (id={rid!r}, image={image_path if image_path else '<none>'})"
            if on_error == "raise":
                raise DatasetError(f"{where}: {problem.problem}. Fix: {problem.fix}{_SKIP_HINT}.") from None
            skipped.append((index, f"record {index} (id={rid!r}): {problem.problem}"))

    if skipped:
        shown = "; ".join(reason for _, reason in skipped[:5]) + ("; ..." if len(skipped) > 5 else "")
        warnings.warn(f"{json_path}: skipped {len(skipped)} of {len(records)} records: {shown}",
                      DatasetWarning, stacklevel=2)
    if not items:
        raise DatasetError(f"{json_path}: none of the {len(records)} records is usable (first problem: "
                           f"{skipped[0][1] if skipped else 'no question/answer pairs'}). Fix: check image_root "
                           f"({root or json_path.parent}) and the records' format.")
    return ConversationDataset(items, json_path=json_path, image_root=root, num_records=len(records),
                               skipped=skipped)


def _image_fix(path: Path, root: Path | None, json_path: Path, problem: str) -> str:
    if problem.startswith("image file not found"):
        base = (f"image_root={root} (then the JSON's folder {json_path.parent})" if root is not None
                else f"the JSON's folder {json_path.parent}")
        return (f"paths are resolved against {base}; pass the folder that holds the images as image_root, "
                "or restore the file")
    return "re-download or regenerate this file (it is truncated or not an image)"


def _items(index, rid, record, pairs, image_path, mask_path, default_answer_type) -> list[ConversationItem]:
    answer_type = record.get("answer_type")
    question_type = record.get("question_type")
    image_id = record.get("image_id")
    out = []
    for turn, (raw_question, answer) in enumerate(pairs):
        question, position = _split_image_token(raw_question)
        answer = answer.strip()
        if isinstance(answer_type, str) and answer_type.strip():
            kind = answer_type.strip().lower()
        elif default_answer_type is not None:
            kind = default_answer_type
        else:
            kind = "closed" if answer.lower().rstrip(".") in ("yes", "no") else "open"
        out.append(ConversationItem(
            id=rid, turn=turn, record_index=index, image_path=image_path, question=question, answer=answer,
            answer_type=kind, question_type=str(question_type).lower() if question_type is not None else None,
            mask_path=mask_path, image_token=position, raw_question=raw_question,
            image_id=str(image_id) if image_id is not None else None))
    return out
