"""``medalign prepare data=<name> data.source=...``: a public release -> checked conversation files.

For a dataset name registered in :data:`medalign_platform.data.adapters.ADAPTERS`
(``vqa_rad``, ``slake``, ``pathvqa``, ``iu_xray``, ``mimic_cxr``, ``llava_med``):

1. the layout of ``data.source`` is detected (the release's own, or a parquet mirror); a
   source that matches none, or several at once, is an error naming what was expected;
   pickled files are refused unopened;
2. the adapter reads the release into samples tagged with their released split;
3. every image (and mask) is checked inside the image root: confined (no ``..`` or symlink
   out), present, and decodable (``data.verify_images``); bad records raise one error
   naming the file, the record and the fix, or are skipped and counted (``data.on_error=skip``);
4. where the release has no val split, one is carved from train by image (no image in both),
   deterministically from ``data.split_seed``;
5. train/test image overlap, duplicate questions, dropped and filtered records are counted;
6. ``train.json``, ``val.json``, ``test.json`` (the LLaVA conversation format that
   :mod:`medalign_platform.data.conversations` loads, with extra per-record fields) and
   ``manifest.json`` are written into ``<cache>/datasets/<name>/data-<fingerprint>/``.

The fingerprint hashes the adapter version, the settings, the source path and the size and
modification time of its annotation files, so a changed release or setting prepares a new
copy and an unchanged one is reused. The stage is built in a temporary folder and renamed
into place when complete (:func:`medalign_platform.common.stage_cache.cached_stage`): an
interrupted prepare leaves nothing half-built. Image files are not fingerprinted (hashing
a 300k-image release on every run would cost minutes); pass ``rebuild=true`` after
replacing images in place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ..common.stage_cache import cached_stage, default_cache_dir, read_stage
from .adapters import ADAPTERS, DatasetAdapter
from .settings import PREPARE_KEYS, DataSettings
from .adapters.base import (
    SPLITS,
    Layout,
    PrepareError,
    ReadContext,
    RecordProblem,
    Release,
    Sample,
    Source,
    is_english,
    refuse_pickles,
)

__all__ = ["PreparedDataset", "PrepareError", "adapter_for", "format_summary", "prepare_dataset", "prepared_value",
           "settings_from_section"]

#: Bump when the prepared output changes for the same release and settings.
PREPARE_VERSION = 1



def settings_from_section(section: dict) -> DataSettings:
    """The typed ``data`` section from its preparation keys (loader keys such as ``train`` are not read:
    they may be ``${prepared:...}`` values that need this very preparation)."""
    values = {k: v for k, v in section.items() if k in PREPARE_KEYS and v is not None}
    if "name" not in values:
        raise PrepareError(f"data.name is not set. Fix: pick a dataset group, e.g. data=vqa_rad (known: "
                           f"{sorted(ADAPTERS)}).")
    return DataSettings.from_dict(values)


def adapter_for(settings: DataSettings) -> DatasetAdapter:
    """The release adapter of ``data.name``, with the settings that depend on it checked."""
    if settings.name not in ADAPTERS:
        raise PrepareError(f"data.name={settings.name!r}: no adapter for it. Fix: use one of {sorted(ADAPTERS)} "
                           "(or data=synthmed for the embedded default).")
    adapter = ADAPTERS[settings.name]
    checks = [
        (settings.language in adapter.languages, "language", f"one of {list(adapter.languages)} for {settings.name}"),
        (settings.layout in ("auto", *(lay.name for lay in adapter.layouts)), "layout",
         f"auto or one of {[lay.name for lay in adapter.layouts]}"),
    ]
    for ok, key, expected in checks:
        if not ok:
            raise PrepareError(f"data.{key}={getattr(settings, key)!r} is not valid. Fix: use {expected}.")
    return adapter


def recipe_settings(settings: DataSettings, adapter: DatasetAdapter) -> dict:
    """The settings a prepared copy depends on (part of its fingerprint)."""
    keys = ["language", "val_fraction", "split_seed", "on_error", "image_dir", "verify_images"]
    if adapter.task == "report":
        keys += ["view_policy", "report_prompt"]
    return {k: getattr(settings, k) for k in keys}


@dataclass
class PreparedDataset:
    """A prepared copy: its folder, manifest and whether this call built it."""

    name: str
    dir: Path
    manifest: dict
    built: bool = False
    seconds: float = 0.0

    def split_file(self, split: str) -> Path:
        return self.dir / self.manifest["files"][split]

    @property
    def image_root(self) -> Path:
        root = self.manifest["image_root"]
        return self.dir if root == "." else Path(root)

    def value(self, key: str) -> str:
        """``train`` / ``val`` / ``test`` file, ``image_root``, ``dir``, or ``n_train``-style counts."""
        if key in SPLITS:
            return str(self.split_file(key))
        if key == "image_root":
            return str(self.image_root)
        if key == "dir":
            return str(self.dir)
        if key.startswith("n_") and key[2:] in SPLITS:
            return str(self.manifest["splits"][key[2:]]["records"])
        raise PrepareError(f"${{prepared:{key}}}: unknown key. Fix: use train, val, test, image_root, dir, "
                           "n_train, n_val or n_test.")


# --------------------------------------------------------------------------- layout and recipe


def detect_layout(adapter: DatasetAdapter, source: Source, requested: str = "auto") -> Layout:
    """The one layout of ``adapter`` that ``source`` is in (see the module docstring)."""
    refuse_pickles(source, f"data.source={adapter.mirror}" if adapter.mirror else "a parquet export of the release")
    candidates = [lay for lay in adapter.layouts if requested in ("auto", lay.name)]
    matched = [lay for lay in candidates if lay.matches(source)]
    if len(matched) == 1:
        return matched[0]
    if len(matched) > 1:
        raise PrepareError(f"data.source={source.text}: holds more than one layout of {adapter.name} ("
                           + "; ".join(lay.describe for lay in matched) + "), a mixed layout. Fix: point "
                           "data.source at a folder with one of them, or pick one with data.layout="
                           + "|".join(lay.name for lay in matched) + ".")
    expected = "; or ".join(lay.describe for lay in candidates)
    hint = ""
    for other in ADAPTERS.values():
        if other.name != adapter.name and any(lay.name != "parquet" and lay not in adapter.layouts and
                                              _matches_quietly(lay, source) for lay in other.layouts):
            hint = f" It looks like a {other.name} release: use data={other.name}."
            break
    raise PrepareError(f"data.source={source.text}: not a {adapter.name} release in a layout this adapter reads "
                       f"(expected {expected}).{hint} Fix: point data.source at the unpacked release"
                       + (f", or use the parquet mirror data.source={adapter.mirror}" if adapter.mirror else "") + ".")


def _matches_quietly(layout: Layout, source: Source) -> bool:
    try:
        return layout.matches(source)
    except PrepareError:
        return False


def _file_stats(paths: list[Path], root: Path) -> list[list]:
    stats = []
    for path in sorted(set(paths)):
        info = path.stat()
        stats.append([os.path.relpath(path, root), info.st_size, info.st_mtime_ns])
    return stats


def recipe_for(settings: DataSettings) -> tuple[DatasetAdapter, Source, Layout, dict]:
    """Validates the settings, detects the layout and returns everything the output depends on."""
    adapter = adapter_for(settings)
    source = Source.parse(settings.source, settings.revision)
    layout = detect_layout(adapter, source, settings.layout)
    context = _context(settings, None)
    recipe = {
        "prepare_version": PREPARE_VERSION,
        "dataset": adapter.name,
        "layout": layout.name,
        "source": str(source.path) if source.path is not None else source.text,
        "revision": settings.revision,
        "files": _file_stats(layout.files(source, context), source.root) if source.path is not None else [],
        "settings": recipe_settings(settings, adapter),
    }
    return adapter, source, layout, recipe


def _context(settings: DataSettings, out_dir: Path | None) -> ReadContext:
    return ReadContext(name=settings.name, language=settings.language, on_error=settings.on_error,
                       image_dir=settings.image_dir, view_policy=settings.view_policy,
                       report_prompt=settings.report_prompt, out_dir=out_dir)


def dataset_root(settings: DataSettings) -> Path:
    """``<cache_dir>/datasets/<name>`` (``cache_dir`` defaults to ``$MEDALIGN_CACHE``)."""
    base = Path(settings.cache_dir).expanduser() if settings.cache_dir else default_cache_dir()
    return base / "datasets" / settings.name


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """One prepare of a dataset at a time (two sweeps starting together build it once)."""
    import fcntl

    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".prepare.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- checks


def _check_image(path: Path, mode: str) -> tuple[str | None, tuple[int, int] | None]:
    """(problem or None, size or None) of one image file under ``mode``."""
    if not path.is_file():
        return f"image file not found: {path}", None
    if mode == "exists":
        return None, None
    try:
        with Image.open(path) as im:
            size = im.size
            if mode == "decode":
                im.verify()
        if mode == "decode":
            with Image.open(path) as im:
                im.load()
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError ...
        return f"unreadable image {path} ({type(exc).__name__}: {exc})", None
    if size[0] == 0 or size[1] == 0:
        return f"empty image {path} (size {size})", None
    return None, size


def _check_files(paths: list[Path], mode: str) -> dict[Path, tuple[str | None, tuple[int, int] | None]]:
    workers = min(8, 2 * (os.cpu_count() or 1)) if len(paths) > 256 else 1
    if workers == 1:
        return {p: _check_image(p, mode) for p in paths}
    with ThreadPoolExecutor(workers) as pool:  # PIL releases the GIL while decoding
        return dict(zip(paths, pool.map(lambda p: _check_image(p, mode), paths)))


def check_samples(release: Release, context: ReadContext, mode: str, counts: Counter) -> list[Sample]:
    """Samples whose image (and mask) pass ``mode`` and whose text is usable; others go to ``context``."""
    root = release.image_root
    wanted = sorted({root / s.image for s in release.samples} | {root / s.mask for s in release.samples if s.mask})
    checks = _check_files(wanted, mode)
    kept: list[Sample] = []
    for sample in release.samples:
        try:
            problem, size = checks[root / sample.image]
            if problem:
                missing = problem.startswith("image file not found")
                raise RecordProblem("missing image" if missing else "unreadable image", problem,
                                    f"restore the file under {root} (or point data.image_dir at the image folder)"
                                    if missing else "re-download this image (it is truncated or not an image)")
            if context.language == "en" and not is_english(sample.question, sample.answer):
                raise RecordProblem("non-English text", f"the text is not English (question {sample.question!r})",
                                    "set data.language to the record's language, or remove the record")
        except RecordProblem as error:
            context.problem(sample.ref, error)
            continue
        if sample.mask:
            mask_problem, mask_size = checks[root / sample.mask]
            if mask_problem is None and size and mask_size and size != mask_size:
                mask_problem = f"mask {root / sample.mask} is {mask_size[0]}x{mask_size[1]} but the image is " \
                               f"{size[0]}x{size[1]}"
            if mask_problem:
                if context.on_error != "skip":
                    raise PrepareError(f"{sample.ref}: mask: {mask_problem}. Fix: re-download the mask, or pass "
                                       "data.on_error=skip to keep the record without its mask (counted).")
                counts["masks_dropped"] += 1
                sample.mask = None
        kept.append(sample)
    return kept


def unique_ids(samples: list[Sample]) -> int:
    """Makes ids unique (``-dup<k>`` suffixes, in file order); returns how many were renamed."""
    seen: Counter = Counter()
    renamed = 0
    for sample in samples:
        seen[sample.id] += 1
        if seen[sample.id] > 1:
            sample.id = f"{sample.id}-dup{seen[sample.id] - 1}"
            renamed += 1
    return renamed


# --------------------------------------------------------------------------- splits and statistics


def _image_rank(image_id: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{image_id}".encode()).hexdigest()


def carve_val(train: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Moves whole images from train to val until val holds ``ceil(fraction * len(train))`` samples.

    Images are taken in the order of ``sha256(f"{seed}:{image_id}")``, so the carve is
    deterministic, independent of record order, and no image ends up in both splits. At
    least one image stays in train and one goes to val (when train has two or more images).
    """
    by_image: dict[str, list[Sample]] = {}
    for sample in train:
        by_image.setdefault(sample.image_id, []).append(sample)
    if len(by_image) < 2:
        raise PrepareError(f"cannot carve a val split by image from a train split with {len(by_image)} image(s). "
                           "Fix: add more training images or provide a val split.")
    target = max(1, math.ceil(fraction * len(train)))
    chosen: set[str] = set()
    taken = 0
    for image_id in sorted(by_image, key=lambda i: _image_rank(i, seed)):
        if taken >= target or len(chosen) == len(by_image) - 1:
            break
        chosen.add(image_id)
        taken += len(by_image[image_id])
    return ([s for s in train if s.image_id not in chosen], [s for s in train if s.image_id in chosen])


def _question_key(sample: Sample) -> tuple[str, str]:
    from .metrics import normalize_answer

    return sample.image_id, normalize_answer(sample.question)


def split_statistics(splits: dict[str, list[Sample]]) -> dict:
    """Per-split counts, image overlap between splits and duplicate questions."""
    stats: dict[str, Any] = {"splits": {}, "overlap": {}, "duplicates": {}}
    images = {name: {s.image_id for s in samples} for name, samples in splits.items()}
    keys = {name: Counter(_question_key(s) for s in samples) for name, samples in splits.items()}
    for name, samples in splits.items():
        types = Counter(s.answer_type for s in samples)
        stats["splits"][name] = {"records": len(samples), "images": len(images[name]),
                                 **{t: types[t] for t in sorted(types)},
                                 "with_mask": sum(1 for s in samples if s.mask)}
        stats["duplicates"][name] = sum(n - 1 for n in keys[name].values())
    for a, b in (("train", "test"), ("train", "val"), ("val", "test")):
        shared = images[a] & images[b]
        stats["overlap"][f"{a}_{b}_images"] = len(shared)
        stats["overlap"][f"{b}_records_on_{a}_images"] = sum(1 for s in splits[b] if s.image_id in shared)
        stats["duplicates"][f"{b}_in_{a}"] = sum(n for k, n in keys[b].items() if k in keys[a])
    return stats


# --------------------------------------------------------------------------- writing


def conversation_record(sample: Sample, dataset: str) -> dict:
    """One prepared record: LLaVA conversation format plus the release's fields."""
    record = {
        "id": sample.id,
        "image": sample.image,
        "conversations": [{"from": "human", "value": f"<image>\n{sample.question}"},
                          {"from": "gpt", "value": sample.answer}],
        "answer_type": sample.answer_type,
        "question_type": sample.question_type,
        "image_id": sample.image_id,
        "language": sample.language,
        "split": sample.split,
        "dataset": dataset,
        "meta": sample.meta,
    }
    if sample.mask:
        record["mask"] = sample.mask
    return record


def _tree_sha256(out: Path, names: list[str]) -> str:
    digest = hashlib.sha256()
    for name in sorted(names):
        digest.update(name.encode() + b"\0" + hashlib.sha256((out / name).read_bytes()).digest())
    return digest.hexdigest()


def _build(settings: DataSettings, adapter: DatasetAdapter, source: Source, layout: Layout,
           recipe: dict, out: Path) -> dict:
    context = _context(settings, out)
    release = layout.read(source, context)
    counts: Counter = Counter()
    samples = check_samples(release, context, settings.verify_images, counts)
    renamed = unique_ids(samples)
    splits = {name: [s for s in samples if s.split == name] for name in SPLITS}
    carved = None
    if not splits["val"] and splits["train"]:
        splits["train"], splits["val"] = carve_val(splits["train"], float(settings.val_fraction), settings.split_seed)
        for sample in splits["val"]:
            sample.split = "val"
        carved = {"from": "train", "by": "image", "fraction": float(settings.val_fraction),
                  "seed": settings.split_seed}
    for name in SPLITS:
        if not splits[name]:
            dropped = sum(context.skipped.values()) + sum(context.filtered.values())
            raise PrepareError(f"data.source={source.text}: no usable {name} records ({dropped} records dropped or "
                               f"filtered: {dict(context.skipped) or ''} {dict(context.filtered) or ''}). Fix: check "
                               f"data.language={settings.language} and the release's {name} file.")
    files = {}
    for name in SPLITS:
        files[name] = f"{name}.json"
        records = [conversation_record(s, adapter.name) for s in splits[name]]
        (out / files[name]).write_text(json.dumps(records, indent=1, ensure_ascii=False), encoding="utf-8")
    stats = split_statistics(splits)
    types = Counter(s.answer_type for s in samples if s.answer_type in ("closed", "open"))
    manifest = {
        "name": adapter.name,
        "task": adapter.task,
        "layout": layout.name,
        "source": recipe["source"],
        "revision": settings.revision,
        "prepare_version": PREPARE_VERSION,
        "settings": recipe["settings"],
        "image_root": "." if Path(release.image_root).resolve() == out.resolve() else str(release.image_root),
        "files": files,
        **stats,
        "val_carved": carved,
        "answer_types": {"source": release.answer_types, "rule": release.answer_type_rule,
                         "closed": types["closed"], "open": types["open"]},
        "dropped": {"skipped": sum(context.skipped.values()), "skipped_by_reason": dict(context.skipped),
                    "skipped_examples": context.skipped_examples, "filtered": sum(context.filtered.values()),
                    "filtered_by_reason": dict(context.filtered)},
        "masks": {"records_with_mask": sum(1 for s in samples if s.mask), "masks_dropped": counts["masks_dropped"]},
        "renamed_duplicate_ids": renamed,
        "notes": release.notes,
        "tree_sha256": _tree_sha256(out, list(files.values())),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False))
    return {"manifest": "manifest.json", "records": {k: len(v) for k, v in splits.items()}}


def prepare_dataset(settings: DataSettings, *, rebuild: bool = False,
                    log: Callable[[str], None] | None = None) -> PreparedDataset:
    """Prepares (or reuses) the release ``settings`` point at; see the module docstring.

    Args:
        settings: the dataset name, source and options.
        rebuild: build again even when a prepared copy with the same recipe exists.
        log: called with one line when a build starts (e.g. ``print``).

    Raises:
        PrepareError: naming the file, the record or the setting, and the fix.
    """
    adapter, source, layout, recipe = recipe_for(settings)
    root = dataset_root(settings)
    with _locked(root):
        found = None if rebuild else read_stage(root, "data", recipe)
        built = found is None
        if built:
            if log is not None:
                log(f"medalign: preparing {adapter.name} ({layout.name}) from {source.text} into {root} ...")
            found = cached_stage(root, "data", recipe,
                                 lambda out: _build(settings, adapter, source, layout, recipe, out), force=rebuild)
    stage, info = found
    manifest = json.loads((stage / "manifest.json").read_text(encoding="utf-8"))
    return PreparedDataset(adapter.name, stage, manifest, built=built, seconds=float(info.get("seconds", 0.0)))


# --------------------------------------------------------------------------- reporting


def format_summary(prepared: PreparedDataset) -> str:
    """What prepare prints: split sizes, the carve, overlaps, duplicates and drops."""
    m = prepared.manifest
    kinds = ["report"] if m["task"] == "report" else ["closed", "open"]
    lines = [f"{m['name']} ({m['layout']}) from {m['source']}: {'prepared' if prepared.built else 'already prepared'} "
             f"in {prepared.dir}"]
    header = f"  {'split':<6}{'records':>9}{'images':>8}" + "".join(f"{k:>8}" for k in kinds) + f"{'masks':>7}"
    lines.append(header)
    for name in SPLITS:
        row = m["splits"][name]
        lines.append(f"  {name:<6}{row['records']:>9}{row['images']:>8}" + "".join(f"{row.get(k, 0):>8}" for k in kinds)
                     + f"{row['with_mask']:>7}")
    if m["val_carved"]:
        c = m["val_carved"]
        lines.append(f"  val: carved from train by image ({c['fraction']:.0%} of train questions, seed {c['seed']}); "
                     "the release has no val split")
    o = m["overlap"]
    lines.append(f"  train/test image overlap: {o['train_test_images']} test images also in train "
                 f"({o['test_records_on_train_images']} test records on them); reported, not changed")
    d = m["duplicates"]
    lines.append(f"  duplicate questions (same image, same normalised question): train {d['train']}, val {d['val']}, "
                 f"test {d['test']}; test also in train {d['test_in_train']}")
    a = m["answer_types"]
    if a["source"] != "released" and m["task"] != "report":
        lines.append(f"  answer types inferred ({a['rule']}): {a['closed']} closed, {a['open']} open")
    dropped = m["dropped"]
    reasons = {**dropped["skipped_by_reason"], **dropped["filtered_by_reason"]}
    lines.append(f"  dropped: {dropped['skipped']} skipped as bad, {dropped['filtered']} filtered"
                 + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(reasons.items()))})" if reasons else ""))
    if m["masks"]["masks_dropped"]:
        lines.append(f"  masks dropped (unreadable or wrong size): {m['masks']['masks_dropped']}")
    if m["renamed_duplicate_ids"]:
        lines.append(f"  duplicate record ids made unique: {m['renamed_duplicate_ids']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- config and CLI entry points

_PREPARED: dict[str, PreparedDataset] = {}


def prepared_value(section: dict, key: str) -> str:
    """``${prepared:KEY}`` of a ``data`` section: prepares on first use (cached), returns the path or count.

    The result is remembered for the process, so composing a config four times over costs
    one prepare check. A build prints one line to stderr first.
    """
    settings = settings_from_section(section)
    memo = json.dumps({**settings.to_dict(), "root": str(dataset_root(settings))}, sort_keys=True)
    if memo not in _PREPARED or not (_PREPARED[memo].dir / "stage.json").is_file():
        prepared = prepare_dataset(settings, log=lambda line: print(line, file=sys.stderr))
        if prepared.built:
            print(format_summary(prepared), file=sys.stderr)
        _PREPARED[memo] = prepared
    return _PREPARED[memo].value(key)


def prepare_command(section: dict, *, rebuild: bool = False, out=None) -> PreparedDataset:
    """``medalign prepare data=<name> ...``: prepares and prints the summary."""
    settings = settings_from_section(section)
    stream = out or sys.stdout
    prepared = prepare_dataset(settings, rebuild=rebuild, log=lambda line: print(line, file=stream, flush=True))
    print(format_summary(prepared), file=stream)
    print(f"  files: {prepared.split_file('train')} (+ val.json, test.json, manifest.json); images under "
          f"{prepared.image_root}", file=stream)
    return prepared



def resolve_prepared(key: str, _parent_) -> str:
    """``${prepared:train|val|test|image_root|dir|n_train...}`` inside a release's ``data`` group.

    Reads only the group's preparation keys (not ``train``/``val``/``test``, which are
    these very values), prepares the release on first use (cached) and returns the value.
    """
    from ..common.errors import ConfigError

    section = {key_: _parent_.get(key_) for key_ in PREPARE_KEYS if key_ in _parent_}
    try:
        return prepared_value(section, str(key))
    except PrepareError as error:
        raise ConfigError(str(error)) from None


def steps_for_epochs(epochs, _root_) -> int:
    """``${steps_for_epochs:9}``: optimiser steps for that many passes over the prepared train split.

    One step consumes ``trainer.batch_size * trainer.grad_accum * ray.num_workers`` samples
    (the effective batch), so the original work's "9 epochs at effective batch 32" becomes
    ``ceil(9 * n_train / 32)`` steps for whatever train split was prepared.
    """
    n_train = int(resolve_prepared("n_train", _root_.data))
    effective = int(_root_.trainer.batch_size) * int(_root_.trainer.grad_accum) * int(_root_.ray.num_workers)
    return max(1, math.ceil(float(epochs) * n_train / max(effective, 1)))
