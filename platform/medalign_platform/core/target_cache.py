"""On-disk cache of teacher targets, shared by every run and trial (no pickle).

Layout::

    <root>/<teacher.identity[:16]>/shard-<uuid>.safetensors

Each shard holds many entries of two kinds:

* image entries: ``k`` = sha256 of teacher identity, image content hash and grid; two
  tensors, ``"<k>/patch_tokens"`` (fp16 ``[h*w, D_t]``, about 0.3 MiB for ViT-B/16 instead
  of the original 1.27 MiB fp32 Gram matrix) and ``"<k>/cls_attention"`` (fp32 ``[h*w]``);
* question entries (``teacher.attention: prompt_aware``): ``k`` = sha256 of the teacher's
  ``prompt_identity``, image hash, question hash and grid; one tensor
  ``"<k>/prompt_attention"`` (fp32 ``[h*w]``, a few KiB per question).

Each entry has a JSON record in the safetensors metadata: sha256 of its tensors' bytes,
grid, width, the image hash (and ``"kind": "prompt"`` plus the question hash).

Any teacher object can use the cache: image entries need ``identity``, ``grid``, ``width``
and ``encode_images(images, batch_size) -> TeacherOutputs``; question entries also need
``prompt_identity`` and ``encode_prompt_aware(images, questions, batch_size) -> [B, h*w]``
(see :class:`PromptAwareTeacher`).

Why it is safe to share between concurrent trials and processes:

* shards are immutable: written to a temporary file, fsynced, then ``os.replace``d to a
  uuid name, so readers never see a partial shard and writers never collide;
* there is no shared mutable index: each ``TargetCache`` rebuilds its index from the
  shard headers (``safe_open(...).metadata()``, header only) and re-scans for new shards
  on every call;
* every entry is verified (checksum, shape, grid, width) before use; a bad entry is
  recomputed and written to a new shard, and a shard whose header cannot be read is
  renamed ``*.corrupt`` (kept for inspection, never deleted).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid
import warnings
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence, Union

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save as safetensors_save
from torch import Tensor

from ..common.errors import image_read_error
from .teacher import TeacherOutputs

__all__ = ["CacheStats", "ImageLike", "PromptAwareTeacher", "TargetCache", "image_content_hash", "question_hash"]

ImageLike = Union[Image.Image, str, os.PathLike, bytes]

_FORMAT = "medalign-teacher-targets-shard/1"
_SHARD_GLOB = "shard-*.safetensors"
_PATCH, _ATTN, _PROMPT = "patch_tokens", "cls_attention", "prompt_attention"
_READ_CHUNK = 1 << 20


class _Teacher(Protocol):
    """What the cache needs from a teacher (``ExpertTeacher`` satisfies it)."""

    identity: str
    grid: tuple[int, int]
    width: int

    def encode_images(self, images: Sequence[Image.Image],
                      batch_size: int | None = None) -> TeacherOutputs: ...


class PromptAwareTeacher(_Teacher, Protocol):
    """What question entries need besides the image-entry members.

    ``prompt_identity`` must change whenever the question-conditioned map would (weights
    of either tower, the recipe, the tokenizer); ``encode_prompt_aware`` returns ``[B, h*w]``
    float maps on the teacher's native grid, one per (image, question) pair, in input order.
    """

    prompt_identity: str

    def encode_prompt_aware(self, images: Sequence[Image.Image], questions: Sequence[str],
                            batch_size: int | None = None) -> Tensor: ...


def question_hash(question: str) -> str:
    """sha256 of a question's text, exactly as given (UTF-8)."""
    return hashlib.sha256(question.encode("utf-8")).hexdigest()


def image_content_hash(image: ImageLike) -> str:
    """sha256 hex digest identifying an image's content.

    Paths and bytes hash the encoded file bytes (a file and its bytes hash equal). A
    ``PIL.Image`` hashes its decoded content: mode, size, palette (if any) and pixel
    bytes; so a PIL image and the file it was decoded from hash differently.
    """
    h = hashlib.sha256()
    if isinstance(image, Image.Image):
        h.update(f"pil|{image.mode}|{image.size[0]}x{image.size[1]}|".encode())
        palette = image.getpalette() if image.mode in ("P", "PA") else None
        if palette:
            h.update(bytes(palette))
        h.update(image.tobytes())
    elif isinstance(image, (bytes, bytearray, memoryview)):
        h.update(image)
    elif isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as f:
            while chunk := f.read(_READ_CHUNK):
                h.update(chunk)
    else:
        raise TypeError(f"image_content_hash: expected PIL.Image, path or bytes, got "
                        f"{type(image).__name__}")
    return h.hexdigest()


def _input_reader(teacher) -> Callable:
    """What turns an image of the request into the teacher's input: the teacher's own
    ``open_input`` when it has one (SynthMed's oracle reads the label mask next to the image
    file), else :func:`_open_image`."""
    return getattr(teacher, "open_input", None) or _open_image


def _open_image(image: ImageLike) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    source = io.BytesIO(image) if isinstance(image, (bytes, bytearray, memoryview)) else image
    try:
        with Image.open(source) as img:
            img.load()  # decode now: the file handle closes when the with-block ends
            return img.copy()
    except (OSError, SyntaxError, ValueError) as error:  # PIL's errors for truncated or non-image files
        name = "<bytes>" if isinstance(source, io.BytesIO) else source
        raise image_read_error(name, error) from error


def _tensor_bytes_digest(*tensors: Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


@dataclass
class CacheStats:
    """Counters over the lifetime of one ``TargetCache`` (per unique image per call).

    Attributes:
        hits: entries served from disk.
        misses: entries computed by the teacher (includes recomputed corrupt ones).
        corrupt: corruption detections: entries failing verification plus shard files
            that could not be read.
        moved_aside: unreadable shard files renamed to ``*.corrupt``.
    """

    hits: int = 0
    misses: int = 0
    corrupt: int = 0
    moved_aside: int = 0


@dataclass
class _Shard:
    path: Path
    mtime_ns: int
    entries: dict[str, dict]  # entry key -> metadata record


class _Unreadable(Exception):
    """A shard file cannot be parsed (truncated, garbled header, missing tensor)."""


class TargetCache:
    """Teacher targets computed once per (teacher, image, grid) and shared on disk.

    Args:
        root: cache directory; one sub-directory per teacher identity is created in it.

    Attributes:
        root: the cache directory.
        stats: ``CacheStats`` counters for this object.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.stats = CacheStats()
        self._shards: dict[Path, _Shard] = {}
        self._bad: set[tuple[Path, str]] = set()  # (shard, entry) pairs found corrupt

    # ------------------------------------------------------------------ keys & index

    def teacher_dir(self, teacher: _Teacher) -> Path:
        """``<root>/<teacher.identity[:16]>``."""
        return self.root / teacher.identity[:16]

    @staticmethod
    def entry_key(teacher: _Teacher, image_hash: str) -> str:
        """sha256 over teacher identity, image content hash and the teacher grid."""
        h, w = teacher.grid
        return hashlib.sha256(f"{teacher.identity}|{image_hash}|{h}x{w}".encode()).hexdigest()

    @staticmethod
    def question_entry_key(teacher: PromptAwareTeacher, image_hash: str, question: str) -> str:
        """sha256 over the teacher's prompt identity, image hash, question hash and grid."""
        h, w = teacher.grid
        text = f"{teacher.prompt_identity}|{image_hash}|{question_hash(question)}|{h}x{w}|prompt"
        return hashlib.sha256(text.encode()).hexdigest()

    def _move_aside(self, path: Path, reason: str) -> None:
        self._shards.pop(path, None)
        target = path.with_name(path.name + ".corrupt")
        try:
            os.replace(path, target)
        except FileNotFoundError:
            return  # another process moved it first (and counted it)
        self.stats.corrupt += 1
        self.stats.moved_aside += 1
        warnings.warn(f"target cache: unreadable shard {path} ({reason}); moved aside to "
                      f"{target.name}, its entries will be recomputed", RuntimeWarning,
                      stacklevel=3)

    def _read_header(self, path: Path) -> _Shard:
        try:
            mtime_ns = path.stat().st_mtime_ns
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                names = set(f.keys())
        except FileNotFoundError:
            raise
        except Exception as exc:  # safetensors raises its own error types
            raise _Unreadable(str(exc)) from exc
        if metadata.get("format") != _FORMAT:
            raise _Unreadable(f"not a {_FORMAT} shard (format={metadata.get('format')!r})")
        entries = {}
        for key, record in metadata.items():
            if key in ("format", "teacher_identity"):
                continue
            try:
                entries[key] = json.loads(record)
            except json.JSONDecodeError as exc:
                raise _Unreadable(f"bad metadata record for {key[:12]}: {exc}") from exc
            wanted = (_PROMPT,) if entries[key].get("kind") == "prompt" else (_PATCH, _ATTN)
            if any(f"{key}/{name}" not in names for name in wanted):
                raise _Unreadable(f"entry {key[:12]} has no tensors")
        return _Shard(path, mtime_ns, entries)

    def refresh(self, teacher: _Teacher) -> None:
        """Re-scans the teacher's directory: indexes new shards (header only), forgets
        vanished ones and moves unreadable ones aside."""
        directory = self.teacher_dir(teacher)
        present = set(directory.glob(_SHARD_GLOB)) if directory.is_dir() else set()
        for gone in set(self._shards) - present:
            del self._shards[gone]
        for path in sorted(present - set(self._shards)):
            try:
                self._shards[path] = self._read_header(path)
            except FileNotFoundError:
                continue
            except _Unreadable as exc:
                self._move_aside(path, str(exc))

    def _candidates(self, key: str) -> list[_Shard]:
        """Shards holding ``key``, newest first, so a rewrite supersedes a bad copy."""
        shards = [s for s in self._shards.values()
                  if key in s.entries and (s.path, key) not in self._bad]
        return sorted(shards, key=lambda s: (s.mtime_ns, s.path.name), reverse=True)

    # ---------------------------------------------------------------------- reading

    def _verify(self, teacher: _Teacher, record: dict, patch: Tensor | None, attn: Tensor) -> str | None:
        """Returns why an entry is invalid, or ``None`` if it can be used (``patch`` is None for
        question entries)."""
        h, w = teacher.grid
        if patch is None:
            if tuple(record.get("grid", ())) != (h, w):
                return f"grid {record.get('grid')} != {(h, w)}"
            if tuple(attn.shape) != (h * w,) or attn.dtype != torch.float32:
                return f"prompt_attention {attn.dtype} {list(attn.shape)}"
            if _tensor_bytes_digest(attn) != record.get("sha256"):
                return "checksum mismatch"
            return None
        if tuple(record.get("grid", ())) != (h, w) or record.get("width") != teacher.width:
            return (f"grid/width {record.get('grid')}/{record.get('width')} != "
                    f"{(h, w)}/{teacher.width}")
        if tuple(patch.shape) != (h * w, teacher.width) or patch.dtype != torch.float16:
            return f"patch_tokens {patch.dtype} {list(patch.shape)}"
        if tuple(attn.shape) != (h * w,) or attn.dtype != torch.float32:
            return f"cls_attention {attn.dtype} {list(attn.shape)}"
        if _tensor_bytes_digest(patch, attn) != record.get("sha256"):
            return "checksum mismatch"
        return None

    def _load(self, teacher: _Teacher, key: str, handles: dict, stack: ExitStack, prompt: bool = False
              ) -> tuple[Tensor | None, Tensor] | None:
        for shard in self._candidates(key):
            try:
                if shard.path not in handles:
                    handles[shard.path] = stack.enter_context(
                        safe_open(str(shard.path), framework="pt"))
                f = handles[shard.path]
                if prompt:
                    patch, attn = None, f.get_tensor(f"{key}/{_PROMPT}")
                else:
                    patch, attn = f.get_tensor(f"{key}/{_PATCH}"), f.get_tensor(f"{key}/{_ATTN}")
            except FileNotFoundError:
                self._shards.pop(shard.path, None)
                continue
            except Exception as exc:
                self._move_aside(shard.path, str(exc))
                continue
            problem = self._verify(teacher, shard.entries[key], patch, attn)
            if problem is None:
                return patch, attn
            self._bad.add((shard.path, key))
            self.stats.corrupt += 1
            warnings.warn(f"target cache: corrupt entry {key[:12]} in {shard.path.name} "
                          f"({problem}); recomputing", RuntimeWarning, stacklevel=3)
        return None

    # ---------------------------------------------------------------------- writing

    def _write_shard(self, teacher: _Teacher, entries: dict[str, tuple[Tensor, Tensor, str]],
                     prompt_entries: dict[str, tuple[Tensor, str, str]] | None = None) -> Path:
        directory = self.teacher_dir(teacher)
        directory.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, Tensor] = {}
        metadata = {"format": _FORMAT, "teacher_identity": teacher.identity}
        for key, (patch, attn, image_hash) in entries.items():
            tensors[f"{key}/{_PATCH}"], tensors[f"{key}/{_ATTN}"] = patch, attn
            metadata[key] = json.dumps({
                "sha256": _tensor_bytes_digest(patch, attn),
                "grid": list(teacher.grid),
                "width": teacher.width,
                "image": image_hash,
            })
        for key, (attn, image_hash, text_hash) in (prompt_entries or {}).items():
            tensors[f"{key}/{_PROMPT}"] = attn
            metadata[key] = json.dumps({
                "kind": "prompt",
                "sha256": _tensor_bytes_digest(attn),
                "grid": list(teacher.grid),
                "image": image_hash,
                "question": text_hash,
            })
        payload = safetensors_save(tensors, metadata=metadata)
        name = uuid.uuid4().hex
        tmp = directory / f".tmp-{name}.partial"
        final = directory / f"shard-{name}.safetensors"
        try:
            with open(tmp, "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                tmp.unlink()
        self._shards[final] = _Shard(final, final.stat().st_mtime_ns,
                                     {k: json.loads(metadata[k]) for k in [*entries, *(prompt_entries or {})]})
        return final

    def _compute(self, teacher: _Teacher, images: list[ImageLike], batch_size: int
                 ) -> list[tuple[Tensor, Tensor]]:
        results = []
        open_input = _input_reader(teacher)
        for start in range(0, len(images), batch_size):
            batch = [open_input(image) for image in images[start:start + batch_size]]
            out = teacher.encode_images(batch)
            patch = out.patch_tokens.detach().to("cpu", torch.float16)
            if not torch.isfinite(patch).all():
                raise ValueError(
                    "teacher patch tokens overflow fp16 (|x| > 65504), so they cannot be "
                    "cached; compute the teacher online for this model instead.")
            attn = out.cls_attention.detach().to("cpu", torch.float32)
            results += [(patch[i].contiguous(), attn[i].contiguous()) for i in range(len(batch))]
        return results

    # ------------------------------------------------------------------------ API

    def get_or_compute(self, teacher: _Teacher, images: Sequence[ImageLike],
                       keys: Sequence[str] | None = None, batch_size: int = 32,
                       questions: Sequence[str] | None = None) -> TeacherOutputs:
        """Teacher targets for ``images``, computing only those not cached yet.

        Missing (or corrupt) entries are computed with ``teacher.encode_images`` (and, with
        ``questions``, ``teacher.encode_prompt_aware``) in batches of ``batch_size`` and
        written as ONE new shard per call, so call this per chunk of a dataset (e.g. a few
        thousand images), not with all of it at once.

        Args:
            teacher: an ``ExpertTeacher`` (or anything with ``identity``, ``grid``,
                ``width`` and ``encode_images``; with ``questions`` also
                ``prompt_identity`` and ``encode_prompt_aware``, see
                :class:`PromptAwareTeacher`).
            images: PIL images, image file paths, or encoded image bytes.
            keys: optional precomputed ``image_content_hash`` per image (e.g. from a
                dataset manifest), which skips hashing.
            batch_size: images per teacher forward.
            questions: one question per image for question-conditioned attention
                (``teacher.attention: prompt_aware``), cached per (image, question).

        Returns:
            ``TeacherOutputs`` on CPU, in input order: ``patch_tokens`` ``[B, h*w, D_t]``
            float32 holding the stored fp16 values (also for fresh entries, so results do
            not depend on cache state), ``cls_attention`` ``[B, h*w]`` float32 and, with
            ``questions``, ``prompt_attention`` ``[B, h*w]`` float32.
        """
        if len(images) == 0:
            raise ValueError("get_or_compute needs at least one image")
        if keys is not None and len(keys) != len(images):
            raise ValueError(f"keys has {len(keys)} items for {len(images)} images")
        if questions is not None:
            if len(questions) != len(images):
                raise ValueError(f"questions has {len(questions)} items for {len(images)} images")
            missing_api = [name for name in ("prompt_identity", "encode_prompt_aware") if not hasattr(teacher, name)]
            if missing_api:
                raise TypeError(f"per-question targets need a teacher with {missing_api}; "
                                f"{type(teacher).__name__} has none")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        image_hashes = list(keys) if keys is not None else [image_content_hash(i) for i in images]
        entry_keys = [self.entry_key(teacher, h) for h in image_hashes]
        question_keys = ([self.question_entry_key(teacher, h, q) for h, q in zip(image_hashes, questions)]
                         if questions is not None else [])

        self.refresh(teacher)
        found: dict[str, tuple[Tensor, Tensor]] = {}
        missing: dict[str, int] = {}  # entry key -> index of its first image
        found_q: dict[str, Tensor] = {}
        missing_q: dict[str, int] = {}
        with ExitStack() as stack:
            handles: dict = {}
            for index, key in enumerate(entry_keys):
                if key in found or key in missing:
                    continue
                loaded = self._load(teacher, key, handles, stack)
                if loaded is None:
                    missing[key] = index
                else:
                    found[key] = loaded
            for index, key in enumerate(question_keys):
                if key in found_q or key in missing_q:
                    continue
                loaded = self._load(teacher, key, handles, stack, prompt=True)
                if loaded is None:
                    missing_q[key] = index
                else:
                    found_q[key] = loaded[1]
        self.stats.hits += len(found) + len(found_q)
        self.stats.misses += len(missing) + len(missing_q)

        fresh: dict[str, tuple[Tensor, Tensor, str]] = {}
        fresh_q: dict[str, tuple[Tensor, str, str]] = {}
        if missing:
            computed = self._compute(teacher, [images[i] for i in missing.values()], batch_size)
            fresh = {key: (patch, attn, image_hashes[i])
                     for (key, i), (patch, attn) in zip(missing.items(), computed)}
            found.update({key: (patch, attn) for key, (patch, attn, _) in fresh.items()})
        if missing_q:
            maps = self._compute_prompt_aware(teacher, [images[i] for i in missing_q.values()],
                                              [questions[i] for i in missing_q.values()], batch_size)
            fresh_q = {key: (attn, image_hashes[i], question_hash(questions[i]))
                       for (key, i), attn in zip(missing_q.items(), maps)}
            found_q.update({key: attn for key, (attn, _, _) in fresh_q.items()})
        if fresh or fresh_q:
            self._write_shard(teacher, fresh, fresh_q)

        return TeacherOutputs(
            patch_tokens=torch.stack([found[k][0] for k in entry_keys]).float(),
            cls_attention=torch.stack([found[k][1] for k in entry_keys]),
            grid=tuple(teacher.grid),
            prompt_attention=torch.stack([found_q[k] for k in question_keys]) if questions is not None else None,
        )

    def _compute_prompt_aware(self, teacher: PromptAwareTeacher, images: list[ImageLike], questions: list[str],
                              batch_size: int) -> list[Tensor]:
        h, w = teacher.grid
        results = []
        open_input = _input_reader(teacher)
        for start in range(0, len(images), batch_size):
            batch = [open_input(image) for image in images[start:start + batch_size]]
            maps = teacher.encode_prompt_aware(batch, questions[start:start + batch_size])
            maps = maps.detach().to("cpu", torch.float32)
            if tuple(maps.shape) != (len(batch), h * w):
                raise ValueError(f"{type(teacher).__name__}.encode_prompt_aware returned {list(maps.shape)}; "
                                 f"expected [{len(batch)}, {h * w}] (one map per image on the {h}x{w} grid)")
            results += [maps[i].contiguous() for i in range(len(batch))]
        return results
