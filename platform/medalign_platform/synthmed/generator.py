"""SynthMed: the platform's embedded synthetic grounding benchmark (version 3).

Every image is a small "scan" (chest-film-like: an elliptical body with low-frequency
texture, two darker lung fields, a spine band, a heart shadow, soft rib arcs and pixel
noise) holding 0 to 3 lesions, each entirely inside its own quadrant, at least two pixels
away from both midlines, so every location is unambiguous. A lesion has a shape (round,
oval, elongated, irregular), a size (small, medium, large) and a contrast (bright, faint);
the lesions of one image take *different* values of each attribute where the attribute
has enough values, so that naming one lesion's value needs looking at that lesion.

Text (:mod:`.questions`): the base model's pre-training corpus (reports and image-level
questions, ``pretrain_<split>.json``) and the benchmark task (``<split>.json``):
location-conditioned questions: closed "in the left upper quadrant, is there a lesion?"
(one "yes", one "no" per image with a lesion, so a reader that pools the image scores 1/2)
and open "in the left upper quadrant, what is the size of the lesion?", so only looking at
the named place answers them. Version 3 changed only the task (version 2 asked closed
attribute questions the tiny student never learned; docs/synthmed.md).

Conventions
-----------
* ``left``/``right`` are the **viewer's** (image) left and right: column ``< S/2`` is
  left. ``upper``/``lower``: row ``< S/2`` is upper. Quadrants are named
  ``"left upper"``, ``"right upper"``, ``"left lower"``, ``"right lower"``; lesions are
  listed (report, answers, mask labels) in that order.
* ``masks/<image_id>.png``: 8-bit label mask, same size as the image: 0 = background,
  ``i`` = the ``i``-th lesion (1..k). ``masks/<image_id>-<labels>.png`` (e.g. ``-2``,
  ``-13``): binary (0/255) mask of just those lesions. A record's ``mask`` is the region
  its question is about: the lesion in the quadrant a task question names, or
  ``masks/<image_id>-<lu|ru|ll|rl>.png`` (0/255, the whole quadrant) when that quadrant
  is empty; the lesions an image-level question concerns otherwise (all of them when
  none is singled out).
* ``SYNTHMED_WORDS`` holds every word used in any question, answer or report; the only
  other characters are ``SYNTHMED_PUNCTUATION`` and spaces (after the ``"<image>\\n"``
  prefix of each question).

Layout (the LLaVA conversation format used by LLaVA-Med's VQA-RAD / SLAKE / PathVQA
and IU-Xray files, so one loader,
:func:`medalign_platform.data.conversations.load_conversation_dataset`, serves all)::

    out_dir/images/<image_id>.png          RGB (gray replicated), image_size x image_size
    out_dir/masks/<image_id>[-<labels>].png
    out_dir/<split>.json                   the benchmark task, one record per question:
        {"id", "image_id", "image": "images/<id>.png", "mask": "masks/<id>-<label>.png",
         "conversations": [{"from": "human", "value": "<image>\\n<question>"},
                           {"from": "gpt", "value": "<answer>"}],
         "answer_type": "closed" | "open", "question_type": "presence" | "size" | "contrast",
         "quadrant", "attribute", and for closed questions "distractor", "pooled_answer"}
    out_dir/pretrain_<split>.json          the pre-training corpus (same record format;
                                           answer_type "report" for the reports)
    out_dir/annotations/<split>.json       per image: lesion attributes, centre, bbox, area
    out_dir/manifest.json                  version, seed, sizes, counts, baselines, sha256s

The ``train`` task file holds the questions of the first ``task_train_images`` train
images only: the fine-tuning budget is deliberately small (see docs/synthmed.md).

Generation is deterministic: image ``index`` of ``split`` draws only from numpy
``Generator``s seeded by ``(seed, split, index)``, so the result does not depend on the
number of worker processes, and PNGs are written with fixed PIL settings. The same seed
gives byte-identical files (on the same zlib/Pillow build); ``manifest.json`` records a
sha256 of the whole tree for cache invalidation. Bump :data:`SYNTHMED_VERSION` whenever
the generator's output changes.

This module is longer than 600 lines because rendering, lesion placement and the
writer share one version number (:data:`SYNTHMED_VERSION`); the text lives in ``questions.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..common.atomic import move_into_place, replaceable
from .questions import (
    CONTRASTS,
    QUADRANTS,
    SHAPES,
    SIDES,
    SIZES,
    SYNTHMED_PUNCTUATION,
    SYNTHMED_WORDS,
    LesionFacts,
    pretrain_questions,
    task_questions,
)

__all__ = [
    "CONTRASTS",
    "DEFAULT_SIZES",
    "DEFAULT_TASK_TRAIN_IMAGES",
    "QUADRANTS",
    "SHAPES",
    "SIDES",
    "SIZES",
    "SPLITS",
    "SYNTHMED_PUNCTUATION",
    "SYNTHMED_VERSION",
    "SYNTHMED_WORDS",
    "ensure_synthmed",
    "generate_synthmed",
    "load_manifest",
    "pretrain_file",
    "tree_sha256",
]

#: Bump whenever the generator's output (pixels, text, layout) changes.
SYNTHMED_VERSION = 3

SPLITS = ("train", "val", "test")
DEFAULT_SIZES = {"train": 5000, "val": 500, "test": 500}
#: Train images whose task questions go into ``train.json`` (the fine-tuning budget).
DEFAULT_TASK_TRAIN_IMAGES = 1000
DEFAULT_IMAGE_SIZE = 64
MIN_IMAGE_SIZE = 32

_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}
#: P(0, 1, 2, 3 lesions): single-lesion images teach the base model to read a lesion; the
#: task asks about images with two or three.
_COUNT_P = (0.1, 0.3, 0.3, 0.3)
# Equivalent radius (radius of the circle of the same area) as a fraction of image_size:
# at 64 px 3.2-3.8 / 4.8-5.4 / 6.4-7.0 px, so even a small lesion spans ~35 pixels and its
# shape can be seen (version 1's 2.2-2.9 px small lesions were 4-5 pixels across).
_SIZE_RANGE = {"small": (0.05, 0.06), "medium": (0.075, 0.085), "large": (0.10, 0.11)}
# Axis ratio (major / minor) of the elliptical shapes.
_RATIO_RANGE = {"round": (1.0, 1.1), "elongated": (2.8, 3.4)}
_CONTRAST_RANGE = {"bright": (70.0, 90.0), "faint": (28.0, 38.0)}
_MIDLINE_GAP_PX = 2          # lesion pixels keep this many columns/rows off each midline
_MIN_LESION_PX = 3
_PLACEMENT_TRIES = 4000     # rare: a large elongated lesion in a small body needs a diagonal fit
_RIM_MARGIN_PX = 4          # the soft rim (field 1.0-1.2) of the largest lesion reaches < 3 px out
_FAR = 10.0                 # field value outside the computed window: no intensity there
_MANIFEST = "manifest.json"
_PNG = {"format": "PNG", "compress_level": 6, "optimize": False}


def pretrain_file(split: str) -> str:
    """File name of a split's pre-training corpus (``pretrain_<split>.json``)."""
    return f"pretrain_{split}.json"


# --------------------------------------------------------------------------- rendering


@dataclass
class _Lesion:
    quadrant: str
    shape: str
    size: str
    contrast: str
    amplitude: float
    field: np.ndarray        # level set over the image, <= 1 inside
    mask: np.ndarray         # bool

    @property
    def side(self) -> str:
        return self.quadrant.split()[0]


def _soft_inside(f: np.ndarray, width: float) -> np.ndarray:
    """1 well inside the level set ``f <= 1``, 0 well outside, a linear ramp between."""
    return np.clip((1.0 + width - f) / (2.0 * width), 0.0, 1.0)


def _ellipse_field(u, v, cx, cy, ax, ay, theta=0.0):
    du, dv = u - cx, v - cy
    c, s = math.cos(theta), math.sin(theta)
    x, y = c * du + s * dv, -s * du + c * dv
    return np.sqrt((x / ax) ** 2 + (y / ay) ** 2)


def _upsample(coarse: np.ndarray, size: int) -> np.ndarray:
    """Bilinear upsampling of a small grid to ``size x size`` (pure numpy, deterministic)."""
    n = coarse.shape[0]
    pos = (np.arange(size) + 0.5) / size * (n - 1)
    i0 = np.clip(np.floor(pos).astype(int), 0, n - 2)
    w = pos - i0
    rows = coarse[i0] * (1 - w)[:, None] + coarse[i0 + 1] * w[:, None]
    return rows[:, i0] * (1 - w)[None, :] + rows[:, i0 + 1] * w[None, :]


def _anatomy(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, size: int):
    """Background scan (float intensities) and the region where lesions may lie."""
    cx, cy = 0.5 + rng.normal(0, 0.01), 0.5 + rng.normal(0, 0.01)
    body_field = _ellipse_field(u, v, cx, cy, rng.uniform(0.43, 0.47), rng.uniform(0.44, 0.48))
    body = _soft_inside(body_field, 0.04)
    img = 12.0 + body * rng.uniform(95.0, 115.0)
    img += body * _upsample(rng.normal(0, 1, (6, 6)), size) * rng.uniform(6.0, 10.0)
    # spine and heart shadow
    img += body * rng.uniform(12.0, 18.0) * np.clip(1.0 - np.abs(u - cx) / 0.04, 0.0, 1.0)
    heart = _soft_inside(_ellipse_field(u, v, cx + rng.uniform(0.03, 0.07), cy + rng.uniform(0.08, 0.14),
                                        rng.uniform(0.10, 0.14), rng.uniform(0.08, 0.11)), 0.3)
    img += rng.uniform(8.0, 14.0) * heart
    for side in (-1.0, 1.0):
        lcx = cx + side * rng.uniform(0.19, 0.22)
        lcy = cy + rng.uniform(-0.04, 0.0)
        lung = _soft_inside(_ellipse_field(u, v, lcx, lcy, rng.uniform(0.13, 0.16), rng.uniform(0.27, 0.31)), 0.15)
        img -= rng.uniform(30.0, 42.0) * lung
        # ribs: soft arcs curving down away from the spine, visible over the lung
        amp, width, curve = rng.uniform(10.0, 16.0), rng.uniform(0.012, 0.018), rng.uniform(0.9, 1.4)
        for k in range(int(rng.integers(5, 7))):
            y_k = lcy - 0.27 + k * 0.1 + rng.normal(0, 0.008) + curve * (u - cx) ** 2
            img += amp * np.exp(-(((v - y_k) / width) ** 2)) * lung
    allowed = body_field <= 0.92
    return img, allowed


def _quadrant_box(quadrant: str, size: int) -> tuple[int, int, int, int]:
    """Pixel box ``(row0, row1, col0, col1)`` (exclusive ends) a lesion must stay inside."""
    half, gap = size // 2, _MIDLINE_GAP_PX
    col = (0, half - gap) if quadrant.startswith("left") else (half + gap, size)
    row = (0, half - gap) if quadrant.endswith("upper") else (half + gap, size)
    return row[0], row[1], col[0], col[1]


def _connected8(mask: np.ndarray) -> bool:
    """Whether the True pixels of ``mask`` form one 8-connected component."""
    points = set(zip(*np.nonzero(mask)))
    if not points:
        return False
    stack = [next(iter(points))]
    seen = {stack[0]}
    while stack:
        r, c = stack.pop()
        for dr in (-1, 0, 1):
            for dc in (-1, 0, 1):
                p = (r + dr, c + dc)
                if p in points and p not in seen:
                    seen.add(p)
                    stack.append(p)
    return len(seen) == len(points)


def _place_lesion(rng, u, v, size, allowed, quadrant, shape, size_name, contrast) -> _Lesion:
    r0, r1, c0, c1 = _quadrant_box(quadrant, size)
    # Fields are computed on the box plus a margin that holds the soft rim (field <= 1.2)
    # of any lesion inside it; beyond it the field is "far" (no intensity).
    m = _RIM_MARGIN_PX
    w0, w1, x0, x1 = max(0, r0 - m), min(size, r1 + m), max(0, c0 - m), min(size, c1 + m)
    u_w, v_w = u[w0:w1, x0:x1], v[w0:w1, x0:x1]
    region = np.zeros((w1 - w0, x1 - x0), bool)
    region[r0 - w0:r1 - w0, c0 - x0:c1 - x0] = True
    region &= allowed[w0:w1, x0:x1]
    for _ in range(_PLACEMENT_TRIES):
        r_eq = rng.uniform(*_SIZE_RANGE[size_name])
        theta = rng.uniform(0.0, math.pi)
        if shape == "irregular":
            amps = np.array([rng.uniform(0.08, 0.15), rng.uniform(0.25, 0.35), rng.uniform(0.10, 0.18)])
            phases = rng.uniform(0.0, 2 * math.pi, 3)
            r_base = r_eq / math.sqrt(1.0 + float(np.sum(amps ** 2)) / 2.0)
            half_x = half_y = r_base * (1.0 + float(amps.sum()))
        else:
            ratio = rng.uniform(*_RATIO_RANGE[shape])
            a, b = r_eq * math.sqrt(ratio), r_eq / math.sqrt(ratio)
            half_x = math.hypot(a * math.cos(theta), b * math.sin(theta))
            half_y = math.hypot(a * math.sin(theta), b * math.cos(theta))
        lo_u, hi_u = c0 / size + half_x, c1 / size - half_x
        lo_v, hi_v = r0 / size + half_y, r1 / size - half_y
        if lo_u >= hi_u or lo_v >= hi_v:
            continue
        cx, cy = rng.uniform(lo_u, hi_u), rng.uniform(lo_v, hi_v)
        if shape == "irregular":
            du, dv = u_w - cx, v_w - cy
            phi = np.arctan2(dv, du) - theta
            radius = r_base * (1.0 + amps[0] * np.cos(2 * phi + phases[0]) + amps[1] * np.cos(3 * phi + phases[1])
                               + amps[2] * np.cos(5 * phi + phases[2]))
            window = np.hypot(du, dv) / radius
        else:
            window = _ellipse_field(u_w, v_w, cx, cy, a, b, theta)
        inside = window <= 1.0
        if inside.sum() < _MIN_LESION_PX or (inside & ~region).any() or not _connected8(inside):
            continue
        field = np.full((size, size), _FAR)
        field[w0:w1, x0:x1] = window
        mask = np.zeros((size, size), bool)
        mask[w0:w1, x0:x1] = inside
        return _Lesion(quadrant, shape, size_name, contrast, rng.uniform(*_CONTRAST_RANGE[contrast]), field, mask)
    raise RuntimeError(f"SynthMed: could not place a {size_name} {shape} lesion in the {quadrant} quadrant "
                       f"of a {size}px image; use a larger image_size")


def _distinct_values(rng: np.random.Generator, values: Sequence[str], k: int) -> list[str]:
    """``k`` values, all different while ``k <= len(values)`` (then repeating a permutation)."""
    order = rng.permutation(len(values))
    return [values[int(order[i % len(values)])] for i in range(k)]


def _render(seed: int, split: str, index: int, size: int):
    """One image: uint8 RGB array, uint8 label mask, lesions (quadrant order), text rng."""
    anatomy_rng, lesion_rng, text_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence([seed, _SPLIT_CODE[split], index]).spawn(3))
    v, u = (np.mgrid[0:size, 0:size].astype(np.float64) + 0.5) / size
    img, allowed = _anatomy(anatomy_rng, u, v, size)
    count = int(lesion_rng.choice(len(_COUNT_P), p=_COUNT_P))
    quadrants = sorted(lesion_rng.choice(len(QUADRANTS), size=count, replace=False).tolist())
    shapes = _distinct_values(lesion_rng, SHAPES, count)
    sizes = _distinct_values(lesion_rng, SIZES, count)
    contrasts = _distinct_values(lesion_rng, CONTRASTS, count)
    lesions = [_place_lesion(lesion_rng, u, v, size, allowed, QUADRANTS[q], shapes[i], sizes[i], contrasts[i])
               for i, q in enumerate(quadrants)]
    labels = np.zeros((size, size), np.uint8)
    for k, lesion in enumerate(lesions, start=1):
        texture = 1.0 + 0.08 * lesion_rng.normal(0, 1, (size, size))
        img += lesion.amplitude * np.clip((1.2 - lesion.field) / 0.4, 0.0, 1.0) * texture
        labels[lesion.mask] = k
    img += anatomy_rng.normal(0, anatomy_rng.uniform(3.0, 5.0), (size, size))
    gray = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2), labels, lesions, text_rng


# --------------------------------------------------------------------------- generation


def _record(image_id: str, image_rel: str, mask_rel: str, question) -> dict:
    qtype, atype, text, answer, _, extra = question
    suffix = f"{qtype}-{atype}" if qtype != atype else qtype
    return {"id": f"{image_id}-{suffix}", "image_id": image_id, "image": image_rel, "mask": mask_rel,
            "conversations": [{"from": "human", "value": f"<image>\n{text}"}, {"from": "gpt", "value": answer}],
            "answer_type": atype, "question_type": qtype, **extra}


def _unique_ids(records: list[dict]) -> list[dict]:
    """Numbers repeated ids of one image (``-2``, ``-3`` ...) in order."""
    seen: Counter = Counter()
    for record in records:
        seen[record["id"]] += 1
        if seen[record["id"]] > 1:
            record["id"] = f"{record['id']}-{seen[record['id']]}"
    return records


def _generate_chunk(root: str, seed: int, split: str, indices: Sequence[int], size: int, id_width: int,
                    task_images: int):
    """Render, write and describe a run of images (runs in worker processes too)."""
    root_path = Path(root)
    results = []
    for index in indices:
        image_id = f"{split}-{index:0{id_width}d}"
        rgb, labels, lesions, text_rng = _render(seed, split, index, size)
        image_rel, label_rel = f"images/{image_id}.png", f"masks/{image_id}.png"
        Image.fromarray(rgb).save(root_path / image_rel, **_PNG)
        Image.fromarray(labels).save(root_path / label_rel, **_PNG)
        facts = [LesionFacts(k, les.quadrant, les.shape, les.size, les.contrast)
                 for k, les in enumerate(lesions, start=1)]
        every = tuple(f.label for f in facts)
        written: dict[tuple[int, ...], str] = {every: label_rel, (): label_rel}

        def mask_for(which: tuple[int, ...]) -> str:
            if which not in written:   # the lesions a question concerns, as a 0/255 mask
                rel = f"masks/{image_id}-{''.join(str(k) for k in which)}.png"
                binary = np.isin(labels, which).astype(np.uint8) * 255
                Image.fromarray(binary).save(root_path / rel, **_PNG)
                written[which] = rel
            return written[which]

        def region_for(question) -> str:
            """A task question about an empty quadrant concerns the quadrant itself."""
            if question[4] or "quadrant" not in question[5]:
                return mask_for(question[4])
            quadrant = question[5]["quadrant"]
            rel = f"masks/{image_id}-{''.join(word[0] for word in quadrant.split())}.png"   # e.g. -lu
            if rel not in written.values():
                half = size // 2   # the whole quadrant, as the oracle teacher reads it
                rows = slice(0, half) if quadrant.endswith("upper") else slice(half, size)
                cols = slice(0, half) if quadrant.startswith("left") else slice(half, size)
                box = np.zeros_like(labels)
                box[rows, cols] = 255
                Image.fromarray(box).save(root_path / rel, **_PNG)
                written[(quadrant,)] = rel
            return rel

        pretrain = [_record(image_id, image_rel, mask_for(q[4]), q) for q in pretrain_questions(text_rng, facts)]
        # Task questions draw from their own stream, so the corpus does not depend on them.
        task_rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_CODE[split], index, 1]))
        task = [_record(image_id, image_rel, region_for(q), q) for q in task_questions(task_rng, facts)]
        if split == "train" and index >= task_images:
            task = []
        annotation = {"id": image_id, "image": image_rel, "mask": label_rel, "lesions": []}
        for fact, les in zip(facts, lesions):
            rows, cols = np.nonzero(les.mask)
            annotation["lesions"].append({
                "label": fact.label, "quadrant": les.quadrant, "side": les.side, "shape": les.shape,
                "size": les.size, "contrast": les.contrast, "area": int(rows.size),
                "mask": mask_for((fact.label,)),
                "centroid": [round(float(cols.mean()), 3), round(float(rows.mean()), 3)],
                "bbox": [int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1],
            })
        results.append((index, annotation, _unique_ids(pretrain), _unique_ids(task)))
    return split, results


def _write_json_list(path: Path, items: list) -> None:
    """A JSON list with one item per line: compact, diffable, byte-stable."""
    body = ",\n".join(json.dumps(item, ensure_ascii=True, separators=(", ", ": ")) for item in items)
    path.write_text("[\n" + body + "\n]\n" if items else "[]\n", encoding="utf-8")


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_sha256(root: str | os.PathLike, *, exclude: Sequence[str] = (_MANIFEST,)) -> str:
    """sha256 over every file below ``root`` (relative path and content), in sorted order.

    ``exclude`` lists top-level relative paths to leave out (the manifest by default).
    """
    root = Path(root)
    digest = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.is_file())
    for path in files:
        rel = path.relative_to(root).as_posix()
        if rel in exclude:
            continue
        digest.update(rel.encode() + b"\0" + _file_sha256(path).encode() + b"\n")
    return digest.hexdigest()


def _resolve_sizes(n_train, n_val, n_test) -> dict[str, int]:
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    for split, n in sizes.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"SynthMed: n_{split} must be a non-negative int, got {n!r}")
    return sizes


def _answers(records: list[dict], answer_type: str) -> list[str]:
    return [r["conversations"][1]["value"] for r in records if r["answer_type"] == answer_type]


def _task_figures(records: list[dict]) -> dict:
    """Answer balance and the accuracy of two readers that never route: always "no", and
    answering the image-level question ("is there a lesion anywhere?", ``pooled_answer``)."""
    closed = [r for r in records if r["answer_type"] == "closed"]
    if not closed:
        return {"closed": 0}
    answers = [r["conversations"][1]["value"] for r in closed]
    return {
        "closed": len(closed),
        "open": sum(r["answer_type"] == "open" for r in records),
        "closed_yes_fraction": round(answers.count("yes") / len(answers), 4),
        "always_no_accuracy": round(answers.count("no") / len(answers), 4),
        "pooled_reader_accuracy": round(sum(r["pooled_answer"] == a for r, a in zip(closed, answers)) / len(closed), 4),
        "no_with_distractor": round(sum(r["distractor"] for r in closed) / max(1, answers.count("no")), 4),
    }


def generate_synthmed(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    n_train: int = DEFAULT_SIZES["train"],
    n_val: int = DEFAULT_SIZES["val"],
    n_test: int = DEFAULT_SIZES["test"],
    task_train_images: int = DEFAULT_TASK_TRAIN_IMAGES,
    image_size: int = DEFAULT_IMAGE_SIZE,
    workers: int | None = None,
    progress: bool = True,
    chunk_size: int = 50,
) -> dict:
    """Generate SynthMed into ``out_dir`` and return its manifest (also ``out_dir/manifest.json``).

    ``task_train_images``: the first this many train images get task questions in
    ``train.json`` (all images are in the pre-training corpus). ``workers``: processes to
    render with (``None``: up to 4, one per CPU; ``1``: in this process). The output does
    not depend on it. The tree is built in a temporary sibling directory and moved into
    place when complete, so a partial ``out_dir`` never exists. An existing ``out_dir`` is
    replaced only if it is empty or a previous SynthMed generation (it has our
    ``manifest.json``); anything else raises ``FileExistsError``.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"SynthMed: seed must be a non-negative int, got {seed!r}")
    if not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"SynthMed: image_size must be an int >= {MIN_IMAGE_SIZE}, got {image_size!r}")
    if isinstance(task_train_images, bool) or not isinstance(task_train_images, int) or task_train_images < 0:
        raise ValueError(f"SynthMed: task_train_images must be a non-negative int, got {task_train_images!r}")
    sizes = _resolve_sizes(n_train, n_val, n_test)
    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and not replaceable(out_dir, _MANIFEST, "synthmed"):
        raise FileExistsError(f"SynthMed: {out_dir} exists and is not a SynthMed dataset (no {_MANIFEST} "
                              "from this generator); choose an empty or new directory")
    if workers is None:
        workers = max(1, min(4, os.cpu_count() or 1))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    (tmp / "images").mkdir(parents=True)
    (tmp / "masks").mkdir()
    (tmp / "annotations").mkdir()
    start = time.perf_counter()
    try:
        id_width = max(5, len(str(max(sizes.values(), default=1) - 1)))
        jobs = [(split, list(range(lo, min(lo + chunk_size, n))))
                for split, n in sizes.items() for lo in range(0, n, chunk_size)]
        results: dict[str, list] = {split: [] for split in SPLITS}
        total = sum(sizes.values())
        args = (image_size, id_width, task_train_images)
        with tqdm(total=total, desc="SynthMed", unit="img", disable=not progress) as bar:
            pending = jobs
            if workers > 1 and len(jobs) > 1:
                try:
                    done = set()
                    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)),
                                             mp_context=get_context("spawn")) as pool:
                        futures = {pool.submit(_generate_chunk, str(tmp), seed, split, idx, *args): n
                                   for n, (split, idx) in enumerate(jobs)}
                        for future in as_completed(futures):
                            split, part = future.result()
                            results[split].extend(part)
                            done.add(futures[future])
                            bar.update(len(part))
                    pending = []
                except BrokenProcessPool as exc:
                    # e.g. a calling script without an `if __name__ == "__main__":` guard (spawn
                    # re-imports it); the output does not depend on the process layout.
                    warnings.warn(f"SynthMed: worker processes failed ({exc}); continuing in this process",
                                  RuntimeWarning, stacklevel=2)
                    pending = [job for n, job in enumerate(jobs) if n not in done]
            for split, idx in pending:
                results[split].extend(_generate_chunk(str(tmp), seed, split, idx, *args)[1])
                bar.update(len(idx))
        splits_info = {}
        for split in SPLITS:
            part = sorted(results[split], key=lambda item: item[0])
            pretrain = [rec for _, _, recs, _ in part for rec in recs]
            task = [rec for _, _, _, recs in part for rec in recs]
            _write_json_list(tmp / pretrain_file(split), pretrain)
            _write_json_list(tmp / f"{split}.json", task)
            _write_json_list(tmp / "annotations" / f"{split}.json", [ann for _, ann, _, _ in part])
            closed = _answers(pretrain, "closed")
            splits_info[split] = {
                "images": len(part),
                "lesion_counts": dict(sorted(Counter(len(ann["lesions"]) for _, ann, _, _ in part).items())),
                "pretrain": {
                    "records": len(pretrain),
                    "question_types": dict(sorted(Counter(r["question_type"] for r in pretrain).items())),
                    "closed_yes_fraction": round(closed.count("yes") / len(closed), 4) if closed else None,
                },
                "task": {"records": len(task), "images": len({r["image_id"] for r in task}),
                         **_task_figures(task)},
            }
        manifest = {
            "name": "synthmed",
            "version": SYNTHMED_VERSION,
            "seed": seed,
            "image_size": image_size,
            "sizes": sizes,
            "task_train_images": task_train_images,
            "splits": splits_info,
            "mask_format": "uint8 PNG; masks/<id>.png: 0 = background, i = i-th lesion (quadrant order: "
                           + ", ".join(QUADRANTS) + "); masks/<id>-<labels>.png: 0/255 mask of those lesions",
            "side_convention": "viewer's (image) left/right",
            "words": SYNTHMED_WORDS,
            "files": {p.relative_to(tmp).as_posix(): _file_sha256(p)
                      for p in sorted(tmp.glob("*.json")) + sorted((tmp / "annotations").glob("*.json"))},
            "tree_sha256": tree_sha256(tmp),
        }
        (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    manifest = dict(manifest)
    manifest["generation_seconds"] = round(time.perf_counter() - start, 2)   # not written: keeps bytes stable
    return manifest


def load_manifest(out_dir: str | os.PathLike) -> dict | None:
    """The manifest of a generated SynthMed directory, or ``None`` if there is none."""
    try:
        manifest = json.loads((Path(out_dir) / _MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("name") == "synthmed" else None


def ensure_synthmed(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    n_train: int = DEFAULT_SIZES["train"],
    n_val: int = DEFAULT_SIZES["val"],
    n_test: int = DEFAULT_SIZES["test"],
    task_train_images: int = DEFAULT_TASK_TRAIN_IMAGES,
    image_size: int = DEFAULT_IMAGE_SIZE,
    workers: int | None = None,
    progress: bool = True,
    verify: bool = True,
) -> dict:
    """Reuse ``out_dir`` if it holds this exact generation (version, seed, sizes, and with
    ``verify`` the tree sha256), else (re)generate it. Returns the manifest."""
    manifest = load_manifest(out_dir)
    wanted = {"version": SYNTHMED_VERSION, "seed": seed, "image_size": image_size,
              "sizes": _resolve_sizes(n_train, n_val, n_test), "task_train_images": task_train_images}
    if manifest is not None and all(manifest.get(k) == v for k, v in wanted.items()):
        if not verify or tree_sha256(out_dir) == manifest.get("tree_sha256"):
            return manifest
    return generate_synthmed(out_dir, seed=seed, n_train=n_train, n_val=n_val, n_test=n_test,
                             task_train_images=task_train_images, image_size=image_size, workers=workers,
                             progress=progress)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medalign_platform.synthmed.generator",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=DEFAULT_SIZES["train"])
    parser.add_argument("--n-val", type=int, default=DEFAULT_SIZES["val"])
    parser.add_argument("--n-test", type=int, default=DEFAULT_SIZES["test"])
    parser.add_argument("--task-train-images", type=int, default=DEFAULT_TASK_TRAIN_IMAGES)
    parser.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE)
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args(argv)
    manifest = generate_synthmed(args.out_dir, seed=args.seed, n_train=args.n_train, n_val=args.n_val,
                                 n_test=args.n_test, task_train_images=args.task_train_images,
                                 image_size=args.image_size, workers=args.workers)
    print(json.dumps({k: manifest[k] for k in ("version", "seed", "sizes", "splits", "tree_sha256",
                                               "generation_seconds")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
