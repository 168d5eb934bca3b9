"""The SynthMed oracle teacher: MedAlign targets from the true masks (the positive control).

A benchmark meant to reward grounding needs a teacher that is right by construction: if
even this teacher cannot lift the student's test accuracy above LoRA-only fine-tuning,
the benchmark cannot reward grounding at all. The oracle produces exactly what an expert
CLIP produces (``core.teacher.TeacherOutputs``: native-grid patch tokens and attention
maps), so the same objective, losses and target cache serve it:

* **attention**, per (image, question) (``teacher.attention=prompt_aware``, the platform's
  question-conditioned targets, cached per image and question): each grid cell's share of
  the area of the lesion the question names ("in the left upper quadrant, ..." -> the
  lesion in that quadrant; every SynthMed lesion lies inside one quadrant), or the whole
  quadrant when it holds none ("in the right lower quadrant, is there a lesion?" -> "no"
  is read there). A question that names no quadrant points at every lesion; an image
  without lesions, asked about none, gives a uniform map.
  With ``teacher.attention=cls`` the per-image map points at every lesion;
* **patch tokens** ``[h*w, 1 + MAX_LESIONS]``: per cell, the fraction of its pixels that
  are background, lesion 1, lesion 2, lesion 3 (from the image's label mask). Their
  cosine similarities are MedAlign's similarity target: 1 within the background and
  within one lesion, 0 between a lesion and the background or between two lesions, in
  between on mixed cells (a lesion/background block structure).

The label mask is found next to the image: ``<root>/images/<id>.png`` ->
``<root>/masks/<id>.png`` (SynthMed's layout); the target cache hands the teacher that
mask instead of decoding the image (:meth:`OracleTeacher.open_input`).

Config (``experiments/teacher/synthmed_oracle.yaml``)::

    name: synthmed-oracle
    factory: medalign_platform.synthmed.oracle_teacher:build_oracle_teacher
    attention: prompt_aware
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..core.teacher import TeacherOutputs
from .questions import QUADRANTS

__all__ = ["MAX_LESIONS", "ORACLE_GRID", "ORACLE_VERSION", "OracleTeacher", "build_oracle_teacher",
           "oracle_targets", "relevant_region"]

#: Bump when the target definition changes: it is part of the cache identity.
ORACLE_VERSION = "synthmed-oracle/v3:named-lesion-or-empty-quadrant-area-share,label-fraction-tokens"
MAX_LESIONS = 3
#: The SynthMed student's visual grid (64 px images, 8 px patches).
ORACLE_GRID = (8, 8)
_NAMED_QUADRANT = re.compile(r"\b(" + "|".join(QUADRANTS) + r") quadrant\b")


def _read_array(path: str | os.PathLike) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("L") if im.mode not in ("L", "P", "1") else im)


def _cell_sums(values: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """``[S, S]`` -> ``[h*w]`` sums over each grid cell (sizes must divide)."""
    h, w = grid
    rows, cols = values.shape
    if rows % h or cols % w:
        raise ValueError(f"mask of {rows}x{cols} pixels does not split into a {h}x{w} grid")
    return values.reshape(h, rows // h, w, cols // w).sum(axis=(1, 3)).reshape(-1)


def relevant_region(labels: np.ndarray, question: str | None) -> np.ndarray:
    """``[S, S]`` bool: the pixels a question is about.

    The lesion pixels in the quadrant the question names (viewer's left = columns
    ``< S/2``, upper = rows ``< S/2``), or that whole quadrant when it holds no lesion;
    every lesion when it names none (or ``question`` is None).
    """
    lesions = labels > 0
    match = _NAMED_QUADRANT.search(question or "")
    if match is None:
        return lesions
    rows, cols = labels.shape
    quadrant = match.group(1)
    region = np.zeros_like(lesions)
    r = slice(0, rows // 2) if quadrant.endswith("upper") else slice(rows // 2, rows)
    c = slice(0, cols // 2) if quadrant.startswith("left") else slice(cols // 2, cols)
    region[r, c] = lesions[r, c]
    if not region.any():   # an empty quadrant: the answer ("no") is read from the place itself
        region[r, c] = True
    return region


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


class OracleTeacher:
    """A teacher computed from masks (no weights).

    Satisfies what :class:`~medalign_platform.core.target_cache.TargetCache` needs from a
    teacher (``identity``, ``grid``, ``width``, ``encode_images``), the prompt-aware
    protocol (``prompt_identity``, ``encode_prompt_aware``) and ``open_input`` (what the
    cache hands it for an image file).

    Args:
        grid: ``(h, w)`` target grid; the image side must be a multiple of each.
    """

    has_text = True

    def __init__(self, grid: Sequence[int] = ORACLE_GRID):
        self.grid = (int(grid[0]), int(grid[1]))
        self.width = 1 + MAX_LESIONS
        self.identity = hashlib.sha256(f"{ORACLE_VERSION}|grid={self.grid}".encode()).hexdigest()
        self.prompt_identity = hashlib.sha256(f"{self.identity}|named-quadrant".encode()).hexdigest()

    @staticmethod
    def label_mask_path(image_path: str | os.PathLike) -> Path:
        """SynthMed's layout: ``<root>/images/<id>.png`` -> ``<root>/masks/<id>.png``."""
        image = Path(image_path)
        return image.parent.parent / "masks" / f"{image.stem}.png"

    @classmethod
    def open_input(cls, image) -> np.ndarray:
        """The image file's label mask ``[S, S]`` (all background when there is none)."""
        if not isinstance(image, (str, os.PathLike)):
            raise TypeError(f"the oracle teacher reads label masks next to image files; got {type(image).__name__}")
        label_path = cls.label_mask_path(image)
        if label_path.is_file():
            return _read_array(label_path)
        with Image.open(image) as im:
            return np.zeros((im.height, im.width), np.uint8)

    def _labels(self, inputs) -> list[np.ndarray]:
        if not len(inputs):
            raise ValueError("the oracle teacher needs at least one image")
        return [x if isinstance(x, np.ndarray) else self.open_input(x) for x in inputs]

    def encode_images(self, images: Sequence, batch_size: int | None = None) -> TeacherOutputs:
        """Targets per image (label masks or image paths): attention on every lesion.

        Returns:
            ``TeacherOutputs``: ``patch_tokens`` ``[B, h*w, 1 + MAX_LESIONS]``,
            ``cls_attention`` ``[B, h*w]``, ``grid``.
        """
        pairs = [oracle_targets(labels, labels > 0, self.grid) for labels in self._labels(images)]
        return TeacherOutputs(patch_tokens=torch.from_numpy(np.stack([p for p, _ in pairs])),
                              cls_attention=torch.from_numpy(np.stack([a for _, a in pairs])), grid=self.grid)

    def encode_prompt_aware(self, images: Sequence, questions: Sequence[str],
                            batch_size: int | None = None) -> torch.Tensor:
        """``[B, h*w]``: each cell's share of the area of the lesion each question names."""
        maps = [oracle_targets(labels, relevant_region(labels, q), self.grid)[1]
                for labels, q in zip(self._labels(images), questions, strict=True)]
        return torch.from_numpy(np.stack(maps))


def build_oracle_teacher(teacher) -> OracleTeacher:
    """``teacher.factory`` entry point (the ``teacher`` section is not needed: no weights)."""
    return OracleTeacher(ORACLE_GRID)
