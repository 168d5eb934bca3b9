"""SynthMed: the platform's embedded synthetic grounding benchmark.

Every image is a small "scan" (chest-film-like: an elliptical body with low-frequency
texture, two darker lung fields, a spine band, a heart shadow, soft rib arcs and pixel
noise) holding 0, 1 or 2 lesions. Each lesion has a shape (round, oval, elongated,
irregular), a size (small, medium, large), a contrast (bright, faint) and sits entirely
inside one quadrant of the image, at least two pixels away from both midlines, so that
every location answer is unambiguous. Two lesions always lie in different quadrants.

Questions are only answerable by looking at where and what the lesions are: presence,
side, quadrant, shape, size, contrast (closed yes/no) and count, side, quadrant, shape,
size (open), plus one short report per image. Closed questions ask about a quadrant,
side, shape, ... that is *absent* about as often as about one that is present, so "no"
requires looking too; overall about half of the closed answers are "yes".

Conventions
-----------
* ``left``/``right`` are the **viewer's** (image) left and right: column ``< S/2`` is
  left. ``upper``/``lower``: row ``< S/2`` is upper. Quadrants are named
  ``"left upper"``, ``"right upper"``, ``"left lower"``, ``"right lower"``.
* Lesions are listed (report, two-lesion answers, mask labels) in the quadrant order
  above.
* ``masks/<image_id>.png`` is one 8-bit grayscale PNG per image, same size as the image:
  0 = background, ``i`` = the ``i``-th lesion (1..k) in that order. Threshold ``> 0``
  for a binary mask. Each lesion's mask is one 8-connected component.
* ``SYNTHMED_WORDS`` holds every word used in any question, answer or report; the only
  other characters are ``SYNTHMED_PUNCTUATION`` and spaces (after the ``"<image>\\n"``
  prefix of each question).

Layout (the LLaVA conversation format used by LLaVA-Med's VQA-RAD / SLAKE / PathVQA
and IU-Xray files, so one loader, :func:`medalign_platform.data.conversations.load_conversation_dataset`,
serves all of them)::

    out_dir/images/<image_id>.png          RGB (gray replicated), image_size x image_size
    out_dir/masks/<image_id>.png           uint8 lesion labels (see above)
    out_dir/<split>.json                   list of records, one per question or report:
        {"id", "image_id", "image": "images/<image_id>.png", "mask": "masks/<image_id>.png",
         "conversations": [{"from": "human", "value": "<image>\\n<question>"},
                           {"from": "gpt", "value": "<answer>"}],
         "answer_type": "closed" | "open" | "report",
         "question_type": "presence" | "side" | "quadrant" | "shape" | "size"
                          | "contrast" | "count" | "report"}
    out_dir/annotations/<split>.json       per image: lesion attributes, centre, bbox, area
    out_dir/manifest.json                  version, seed, sizes, counts, sha256s

Generation is deterministic: image ``index`` of ``split`` draws only from a numpy
``Generator`` seeded by ``(seed, split, index)``, so the result does not depend on the
number of worker processes, and PNGs are written with fixed PIL settings. The same seed
gives byte-identical files (on the same zlib/Pillow build); ``manifest.json`` records a
sha256 of the whole tree for cache invalidation. Bump :data:`SYNTHMED_VERSION` whenever
the generator's output changes.
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

__all__ = [
    "CONTRASTS",
    "DEFAULT_SIZES",
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
    "tree_sha256",
]

#: Bump whenever the generator's output (pixels, text, layout) changes.
SYNTHMED_VERSION = 1

SPLITS = ("train", "val", "test")
DEFAULT_SIZES = {"train": 5000, "val": 500, "test": 500}   # ~16 s on 2 cores at 64 px
DEFAULT_IMAGE_SIZE = 64
MIN_IMAGE_SIZE = 32

QUADRANTS = ("left upper", "right upper", "left lower", "right lower")
SIDES = ("left", "right")
SHAPES = ("round", "oval", "elongated", "irregular")
SIZES = ("small", "medium", "large")
CONTRASTS = ("bright", "faint")
COUNT_WORDS = ("zero", "one", "two")

#: Every word of every question, answer and report (lowercase, sorted).
SYNTHMED_WORDS: list[str] = [
    "a", "an", "and", "are", "both", "bright", "describe", "elongated", "faint", "findings",
    "how", "in", "irregular", "is", "large", "left", "lesion", "lesions", "lower", "many",
    "medium", "no", "normal", "of", "on", "one", "oval", "quadrant", "right", "round",
    "shape", "side", "size", "small", "study", "the", "there", "this", "two", "upper",
    "what", "where", "which", "yes", "zero",
]
#: The only non-letter, non-space characters in the text (besides the "<image>" token).
SYNTHMED_PUNCTUATION = ".,:?"

_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}
# Equivalent radius (radius of the circle of the same area) as a fraction of image_size.
_SIZE_RANGE = {"small": (0.035, 0.045), "medium": (0.06, 0.07), "large": (0.085, 0.10)}
# Axis ratio (major / minor) of the elliptical shapes.
_RATIO_RANGE = {"round": (1.0, 1.1), "oval": (1.6, 2.0), "elongated": (2.8, 3.4)}
_CONTRAST_RANGE = {"bright": (70.0, 90.0), "faint": (28.0, 38.0)}
_MIDLINE_GAP_PX = 2          # lesion pixels keep this many columns/rows off each midline
_MIN_LESION_PX = 3
_P_YES = 0.75                # closed questions on an image with lesions: P(ask about a present one)
_MANIFEST = "manifest.json"
_PNG = {"format": "PNG", "compress_level": 6, "optimize": False}


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
    region = np.zeros_like(allowed)
    region[r0:r1, c0:c1] = True
    region &= allowed
    for _ in range(400):
        r_eq = rng.uniform(*_SIZE_RANGE[size_name])
        theta = rng.uniform(0.0, math.pi)
        if shape == "irregular":
            amps = np.array([rng.uniform(0.05, 0.12), rng.uniform(0.18, 0.28), rng.uniform(0.08, 0.15)])
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
            du, dv = u - cx, v - cy
            phi = np.arctan2(dv, du) - theta
            radius = r_base * (1.0 + amps[0] * np.cos(2 * phi + phases[0]) + amps[1] * np.cos(3 * phi + phases[1])
                               + amps[2] * np.cos(5 * phi + phases[2]))
            field = np.hypot(du, dv) / radius
        else:
            field = _ellipse_field(u, v, cx, cy, a, b, theta)
        mask = field <= 1.0
        if mask.sum() < _MIN_LESION_PX or (mask & ~region).any() or not _connected8(mask):
            continue
        return _Lesion(quadrant, shape, size_name, contrast, rng.uniform(*_CONTRAST_RANGE[contrast]), field, mask)
    raise RuntimeError(f"SynthMed: could not place a {size_name} {shape} lesion in the {quadrant} quadrant "
                       f"of a {size}px image; use a larger image_size")


def _render(seed: int, split: str, index: int, size: int):
    """One image: uint8 RGB array, uint8 label mask, lesions (quadrant order), question rng."""
    anatomy_rng, lesion_rng, text_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence([seed, _SPLIT_CODE[split], index]).spawn(3))
    v, u = (np.mgrid[0:size, 0:size].astype(np.float64) + 0.5) / size
    img, allowed = _anatomy(anatomy_rng, u, v, size)
    count = int(lesion_rng.integers(0, 3))
    quadrants = sorted(lesion_rng.choice(len(QUADRANTS), size=count, replace=False).tolist())
    lesions = []
    for q in quadrants:
        shape = SHAPES[int(lesion_rng.integers(len(SHAPES)))]
        size_name = SIZES[int(lesion_rng.integers(len(SIZES)))]
        contrast = CONTRASTS[int(lesion_rng.integers(len(CONTRASTS)))]
        lesions.append(_place_lesion(lesion_rng, u, v, size, allowed, QUADRANTS[q], shape, size_name, contrast))
    labels = np.zeros((size, size), np.uint8)
    for k, lesion in enumerate(lesions, start=1):
        texture = 1.0 + 0.08 * lesion_rng.normal(0, 1, (size, size))
        img += lesion.amplitude * np.clip((1.2 - lesion.field) / 0.4, 0.0, 1.0) * texture
        labels[lesion.mask] = k
    img += anatomy_rng.normal(0, anatomy_rng.uniform(3.0, 5.0), (size, size))
    gray = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2), labels, lesions, text_rng


# --------------------------------------------------------------------------- text


def _pick(rng, options):
    return options[int(rng.integers(len(options)))]


def _closed(rng, present: Sequence[str], absent: Sequence[str]) -> tuple[str, str]:
    """Pick a value to ask about: a present one with P=_P_YES when both kinds exist."""
    if present and (not absent or rng.random() < _P_YES):
        return _pick(rng, list(present)), "yes"
    return _pick(rng, list(absent)), "no"


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _lesion_phrase(lesion: _Lesion) -> str:
    return f"a {lesion.size} {lesion.shape} {lesion.contrast} lesion in the {lesion.quadrant} quadrant"


def _report(lesions: list[_Lesion]) -> str:
    if not lesions:
        return "no lesion. normal study."
    if len(lesions) == 1:
        return f"one lesion: {_lesion_phrase(lesions[0])}."
    return f"two lesions: {_lesion_phrase(lesions[0])} and {_lesion_phrase(lesions[1])}."


def _questions(rng, lesions: list[_Lesion]) -> list[tuple[str, str, str, str]]:
    """``(question_type, answer_type, question, answer)`` for one image."""
    k = len(lesions)
    out = []
    # closed ------------------------------------------------------------------
    if rng.random() < 0.5:
        out.append(("presence", "closed", "is there a lesion?", "yes" if k else "no"))
    else:
        out.append(("presence", "closed", "is this a normal study?", "no" if k else "yes"))
    present_q = [les.quadrant for les in lesions]
    q, ans = _closed(rng, present_q, [x for x in QUADRANTS if x not in present_q])
    out.append(("quadrant", "closed", f"is there a lesion in the {q} quadrant?", ans))
    for qtype, values, attr, template in (
        ("side", SIDES, "side", "is there a lesion on the {} side?"),
        ("shape", SHAPES, "shape", "is there {} lesion?"),
        ("size", SIZES, "size", "is there {} lesion?"),
        ("contrast", CONTRASTS, "contrast", "is there {} lesion?"),
    ):
        present = sorted({getattr(les, attr) for les in lesions}, key=values.index)
        value, ans = _closed(rng, present, [x for x in values if x not in present])
        filler = value if qtype == "side" else _with_article(value)
        out.append((qtype, "closed", template.format(filler), ans))
    # open --------------------------------------------------------------------
    out.append(("count", "open", "how many lesions are there?", COUNT_WORDS[k]))
    if k:
        sides = {les.side for les in lesions}
        side = "both" if len(sides) == 2 else sides.pop()
        if k == 1:
            out.append(("quadrant", "open", "where is the lesion?", f"{lesions[0].quadrant} quadrant"))
            out.append(("side", "open", "which side is the lesion on?", side))
        else:
            where = " and ".join(f"{les.quadrant} quadrant" for les in lesions)
            out.append(("quadrant", "open", "where are the lesions?", where))
            out.append(("side", "open", "which side are the lesions on?", side))
        target = _pick(rng, lesions)
        ref = "the lesion" if k == 1 else f"the lesion in the {target.quadrant} quadrant"
        out.append(("shape", "open", f"what is the shape of {ref}?", target.shape))
        out.append(("size", "open", f"what is the size of {ref}?", target.size))
    out.append(("report", "report", "describe the findings.", _report(lesions)))
    return out


# --------------------------------------------------------------------------- generation


def _generate_chunk(root: str, seed: int, split: str, indices: Sequence[int], size: int, id_width: int):
    """Render, write and describe a run of images (runs in worker processes too)."""
    root_path = Path(root)
    results = []
    for index in indices:
        image_id = f"{split}-{index:0{id_width}d}"
        rgb, labels, lesions, text_rng = _render(seed, split, index, size)
        image_rel, mask_rel = f"images/{image_id}.png", f"masks/{image_id}.png"
        Image.fromarray(rgb).save(root_path / image_rel, **_PNG)
        Image.fromarray(labels).save(root_path / mask_rel, **_PNG)
        records = []
        for qtype, atype, question, answer in _questions(text_rng, lesions):
            records.append({
                "id": f"{image_id}-{qtype}-{atype}" if qtype != atype else f"{image_id}-{qtype}",
                "image_id": image_id,
                "image": image_rel,
                "mask": mask_rel,
                "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                  {"from": "gpt", "value": answer}],
                "answer_type": atype,
                "question_type": qtype,
            })
        annotation = {"id": image_id, "image": image_rel, "mask": mask_rel, "lesions": []}
        for label, les in enumerate(lesions, start=1):
            rows, cols = np.nonzero(les.mask)
            annotation["lesions"].append({
                "label": label, "quadrant": les.quadrant, "side": les.side, "shape": les.shape,
                "size": les.size, "contrast": les.contrast, "area": int(rows.size),
                "centroid": [round(float(cols.mean()), 3), round(float(rows.mean()), 3)],
                "bbox": [int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1],
            })
        results.append((index, annotation, records))
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


def generate_synthmed(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    n_train: int = DEFAULT_SIZES["train"],
    n_val: int = DEFAULT_SIZES["val"],
    n_test: int = DEFAULT_SIZES["test"],
    image_size: int = DEFAULT_IMAGE_SIZE,
    workers: int | None = None,
    progress: bool = True,
    chunk_size: int = 50,
) -> dict:
    """Generate SynthMed into ``out_dir`` and return its manifest (also ``out_dir/manifest.json``).

    ``workers``: processes to render with (``None``: up to 4, one per CPU; ``1``: in
    this process). The output does not depend on it. The tree is built in a temporary
    sibling directory and moved into place when complete, so a partial ``out_dir``
    never exists. An existing ``out_dir`` is replaced only if it is empty or a previous
    SynthMed generation (it has our ``manifest.json``); anything else raises
    ``FileExistsError``.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"SynthMed: seed must be a non-negative int, got {seed!r}")
    if not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"SynthMed: image_size must be an int >= {MIN_IMAGE_SIZE}, got {image_size!r}")
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
        with tqdm(total=total, desc="SynthMed", unit="img", disable=not progress) as bar:
            pending = jobs
            if workers > 1 and len(jobs) > 1:
                try:
                    done = set()
                    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)),
                                             mp_context=get_context("spawn")) as pool:
                        futures = {pool.submit(_generate_chunk, str(tmp), seed, split, idx, image_size, id_width): n
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
                results[split].extend(_generate_chunk(str(tmp), seed, split, idx, image_size, id_width)[1])
                bar.update(len(idx))
        splits_info = {}
        for split in SPLITS:
            part = sorted(results[split], key=lambda item: item[0])
            records = [rec for _, _, recs in part for rec in recs]
            _write_json_list(tmp / f"{split}.json", records)
            _write_json_list(tmp / "annotations" / f"{split}.json", [ann for _, ann, _ in part])
            closed = [r["conversations"][1]["value"] for r in records if r["answer_type"] == "closed"]
            splits_info[split] = {
                "images": len(part),
                "records": len(records),
                "lesion_counts": dict(sorted(Counter(len(ann["lesions"]) for _, ann, _ in part).items())),
                "answer_types": dict(sorted(Counter(r["answer_type"] for r in records).items())),
                "question_types": dict(sorted(Counter(r["question_type"] for r in records).items())),
                "closed_yes_fraction": round(closed.count("yes") / len(closed), 4) if closed else None,
            }
        manifest = {
            "name": "synthmed",
            "version": SYNTHMED_VERSION,
            "seed": seed,
            "image_size": image_size,
            "sizes": sizes,
            "splits": splits_info,
            "mask_format": "uint8 PNG, 0 = background, i = i-th lesion (quadrant order: "
                           + ", ".join(QUADRANTS) + ")",
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
    image_size: int = DEFAULT_IMAGE_SIZE,
    workers: int | None = None,
    progress: bool = True,
    verify: bool = True,
) -> dict:
    """Reuse ``out_dir`` if it holds this exact generation (version, seed, sizes, and with
    ``verify`` the tree sha256), else (re)generate it. Returns the manifest."""
    manifest = load_manifest(out_dir)
    wanted = {"version": SYNTHMED_VERSION, "seed": seed, "image_size": image_size,
              "sizes": _resolve_sizes(n_train, n_val, n_test)}
    if manifest is not None and all(manifest.get(k) == v for k, v in wanted.items()):
        if not verify or tree_sha256(out_dir) == manifest.get("tree_sha256"):
            return manifest
    return generate_synthmed(out_dir, seed=seed, n_train=n_train, n_val=n_val, n_test=n_test,
                             image_size=image_size, workers=workers, progress=progress)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medalign_platform.synthmed.generator", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=DEFAULT_SIZES["train"])
    parser.add_argument("--n-val", type=int, default=DEFAULT_SIZES["val"])
    parser.add_argument("--n-test", type=int, default=DEFAULT_SIZES["test"])
    parser.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE)
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args(argv)
    manifest = generate_synthmed(args.out_dir, seed=args.seed, n_train=args.n_train, n_val=args.n_val,
                                 n_test=args.n_test, image_size=args.image_size, workers=args.workers)
    print(json.dumps({k: manifest[k] for k in ("version", "seed", "sizes", "splits", "tree_sha256",
                                               "generation_seconds")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
