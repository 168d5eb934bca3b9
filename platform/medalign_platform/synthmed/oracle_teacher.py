"""The SynthMed oracle teacher: MedAlign targets from the true masks (the positive control).

A benchmark meant to reward grounding needs a teacher that is right by construction: if
even this teacher cannot lift the student's test accuracy above LoRA-only fine-tuning,
the benchmark cannot reward grounding at all. The oracle produces exactly what an expert
CLIP produces (``core.teacher.TeacherOutputs``: native-grid patch tokens and an attention
map), so the same objective, losses and target cache serve it:

* **attention** ``[h*w]``: each grid cell's share of the area of the region the question
  is about (the record's ``mask``: in SynthMed's task, the one lesion the question
  names), so it sums to 1 (uniform when the region is empty, e.g. a lesion-free image);
* **patch tokens** ``[h*w, 1 + MAX_LESIONS]``: per cell, the fraction of its pixels that
  are background, lesion 1, lesion 2, lesion 3 (from the image's label mask). Their
  cosine similarities are MedAlign's similarity target: 1 within the background and
  within one lesion, 0 between a lesion and the background or between two lesions, in
  between on mixed cells (a lesion/background block structure).

The attention depends on the question, so targets are per (image, question): the teacher
is ``per_question`` and :class:`~medalign_platform.run.evaluation.TargetLookup` keys each
cache entry by image content, relevance-mask content and question text
(:meth:`OracleTeacher.request_key`). The image's label mask is found next to the image:
``<root>/images/<id>.png`` -> ``<root>/masks/<id>.png`` (SynthMed's layout); without it
the relevance mask alone gives the block structure.

Config (``experiments/teacher/synthmed_oracle.yaml``)::

    factory: medalign_platform.synthmed.oracle_teacher:build_oracle_teacher
    name: synthmed-oracle
    grid: [8, 8]
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..core.teacher import TeacherOutputs

__all__ = ["MAX_LESIONS", "ORACLE_VERSION", "OracleRequest", "OracleTeacher", "build_oracle_teacher",
           "oracle_targets"]

#: Bump when the target definition changes: it is part of the cache identity.
ORACLE_VERSION = "synthmed-oracle/v1:relevant-area-share,label-fraction-tokens"
MAX_LESIONS = 3


@dataclass(frozen=True)
class OracleRequest:
    """What the oracle needs for one (image, question) pair."""

    image_path: str
    mask_path: str | None      # the region the question is about (None: nothing)
    question: str


def _read_array(path: str | os.PathLike) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("L") if im.mode not in ("L", "P", "1") else im)


def _cell_sums(values: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """``[S, S]`` -> ``[h*w]`` sums over each grid cell (sizes must divide)."""
    h, w = grid
    rows, cols = values.shape
    if rows % h or cols % w:
        raise ValueError(f"mask of {rows}x{cols} pixels does not split into a {h}x{w} grid; "
                         "set teacher.grid to a divisor of the image size")
    return values.reshape(h, rows // h, w, cols // w).sum(axis=(1, 3)).reshape(-1)


def oracle_targets(labels: np.ndarray, relevant: np.ndarray | None, grid: tuple[int, int]
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Oracle patch tokens and attention for one (image, question).

    Args:
        labels: ``[S, S]`` integer label mask (0 background, k = lesion k <= MAX_LESIONS).
        relevant: ``[S, S]`` bool mask of the region the question is about, or None.
        grid: ``(h, w)`` target grid.

    Returns:
        ``patch_tokens`` float32 ``[h*w, 1 + MAX_LESIONS]`` (per-cell pixel fractions of
        background and each lesion) and ``attention`` float32 ``[h*w]`` (each cell's share
        of the relevant area; uniform when it is empty).
    """
    cells = grid[0] * grid[1]
    pixels_per_cell = labels.size / cells
    channels = [(labels == 0)] + [(labels == k) for k in range(1, MAX_LESIONS + 1)]
    tokens = np.stack([_cell_sums(c.astype(np.float64), grid) for c in channels], axis=1) / pixels_per_cell
    if relevant is not None and relevant.any():
        area = _cell_sums(relevant.astype(np.float64), grid)
        attention = area / area.sum()
    else:
        attention = np.full(cells, 1.0 / cells)
    return tokens.astype(np.float32), attention.astype(np.float32)


def _file_sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class OracleTeacher:
    """A question-conditioned teacher computed from masks (no weights).

    Satisfies what :class:`~medalign_platform.core.target_cache.TargetCache` needs from a
    teacher (``identity``, ``grid``, ``width``, ``encode_images``) plus the per-question
    protocol :class:`~medalign_platform.run.evaluation.TargetLookup` uses
    (``per_question``, ``request``, ``request_key``, ``open_input``).

    Args:
        grid: ``(h, w)`` target grid; the image side must be a multiple of each.
    """

    per_question = True

    def __init__(self, grid: Sequence[int] = (8, 8)):
        self.grid = (int(grid[0]), int(grid[1]))
        self.width = 1 + MAX_LESIONS
        self.identity = hashlib.sha256(f"{ORACLE_VERSION}|grid={self.grid}".encode()).hexdigest()
        self._mask_hashes: dict[str, str] = {}

    # The per-question protocol ---------------------------------------------------------

    def request(self, item: Mapping) -> OracleRequest:
        """The request for a dataset item (``image_path``, ``mask_path``, ``question``)."""
        mask = item.get("mask_path")
        return OracleRequest(str(item["image_path"]), str(mask) if mask else None, str(item["question"]))

    def request_key(self, request: OracleRequest, image_hash: str) -> str:
        """Cache key: image content, relevance-mask content and the question text."""
        mask_hash = ""
        if request.mask_path is not None:
            if request.mask_path not in self._mask_hashes:
                self._mask_hashes[request.mask_path] = _file_sha256(request.mask_path)
            mask_hash = self._mask_hashes[request.mask_path]
        return hashlib.sha256(f"{image_hash}|{mask_hash}|{request.question}".encode()).hexdigest()

    @staticmethod
    def open_input(request: OracleRequest) -> OracleRequest:
        """The cache hands requests through unchanged (there is no image to decode)."""
        return request

    # Targets ---------------------------------------------------------------------------

    @staticmethod
    def label_mask_path(image_path: str | os.PathLike) -> Path:
        """SynthMed's layout: ``<root>/images/<id>.png`` -> ``<root>/masks/<id>.png``."""
        image = Path(image_path)
        return image.parent.parent / "masks" / f"{image.stem}.png"

    def encode_request(self, request: OracleRequest) -> tuple[torch.Tensor, torch.Tensor]:
        relevant = _read_array(request.mask_path) > 0 if request.mask_path else None
        label_path = self.label_mask_path(request.image_path)
        if label_path.is_file():
            labels = _read_array(label_path)
        elif relevant is not None:
            labels = relevant.astype(np.uint8)
        else:
            with Image.open(request.image_path) as im:
                labels = np.zeros((im.height, im.width), np.uint8)
        tokens, attention = oracle_targets(labels, relevant, self.grid)
        return torch.from_numpy(tokens), torch.from_numpy(attention)

    def encode_images(self, requests: Sequence[OracleRequest], batch_size: int | None = None) -> TeacherOutputs:
        """Targets for a batch of requests (the name is the teacher protocol's).

        Returns:
            ``TeacherOutputs``: ``patch_tokens`` ``[B, h*w, 1 + MAX_LESIONS]``,
            ``cls_attention`` ``[B, h*w]`` (the relevant-area shares), ``grid``.
        """
        if not requests:
            raise ValueError("encode_images needs at least one request")
        bad = [type(r).__name__ for r in requests if not isinstance(r, OracleRequest)]
        if bad:
            raise TypeError(f"the oracle teacher needs OracleRequest inputs (one per image and question), got {bad[0]}; "
                            "read targets through TargetLookup with dataset items, not image paths")
        pairs = [self.encode_request(r) for r in requests]
        return TeacherOutputs(patch_tokens=torch.stack([p for p, _ in pairs]),
                              cls_attention=torch.stack([a for _, a in pairs]), grid=self.grid)


def build_oracle_teacher(teacher_config: Mapping) -> OracleTeacher:
    """``teacher.factory`` entry point: an :class:`OracleTeacher` on ``teacher.grid``."""
    grid = teacher_config.get("grid") or (8, 8)
    if isinstance(grid, int):
        grid = (grid, grid)
    if len(grid) != 2 or any(int(g) < 1 for g in grid):
        raise ValueError(f"teacher.grid={grid!r}: give two positive ints, e.g. [8, 8] (the student's visual grid)")
    return OracleTeacher(grid)
