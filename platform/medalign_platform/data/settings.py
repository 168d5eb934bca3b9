"""The ``data`` config section: which conversation files a run reads, and how a release is prepared.

One section serves both jobs. The loader keys (``train``, ``val``, ``test``, ``image_root``,
``answer_types``, ``max_length``, ``on_error``, ``validate_images``) say what a run trains
and evaluates on; the preparation keys (``name``, ``source``, ``language``, ``val_fraction``
...) say how ``medalign prepare data=<name> data.source=...`` turns a public release into
those files (:mod:`medalign_platform.data.prepare`). A release's data group fills the loader
keys from its prepared copy through ``${prepared:train}`` and the like.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from ..common.settings import Settings, setting

SPLITS = ("train", "val", "test")
DEFAULT_REPORT_PROMPT = "Describe the findings of this chest X-ray."
#: The keys that decide what ``medalign prepare`` builds (the rest configure the loader).
PREPARE_KEYS = ("name", "source", "layout", "language", "val_fraction", "split_seed", "on_error", "image_dir",
                "verify_images", "view_policy", "report_prompt", "revision", "cache_dir")


@dataclass
class DataSettings(Settings):
    """Which LLaVA conversation files a run trains and evaluates on, and how a release becomes them."""

    section: ClassVar[str] = "data"

    # -- what a run reads
    train: str | None = setting(None, "LLaVA conversation JSON (or JSONL) of the train split.")
    val: str | None = setting(None, "Val split file: evaluated every trainer.eval_every steps.")
    test: str | None = setting(None, "Test split file: evaluated once, at the end.")
    image_root: str | None = setting(None, "Folder the records' image paths start from (default: each file's folder).")
    answer_types: list[str] | None = setting(None, "Keep only these answer types (e.g. [closed, open] or [report]).")
    max_length: int = setting(256, "Most tokens per sample, image tokens included; only answers are truncated.", ge=1)
    on_error: Literal["raise", "skip"] = setting("raise", "raise: stop at a bad record; skip: drop and count bad records.")
    validate_images: bool = setting(True, "Decode every image up front (catches truncated files before training).")
    # -- how `medalign prepare` builds them from a public release (docs/datasets.md)
    name: str | None = setting(None, "Dataset: vqa_rad | slake | pathvqa | iu_xray | mimic_cxr | llava_med | synthmed.")
    source: str | None = setting(None, "The release as downloaded: a folder or file, or hf:<owner>/<name> (parquet).")
    layout: str = setting("auto", "auto, or the release layout to read (osf_json, slake_json, parquet, r2gen, "
                                  "conversation_json).")
    language: str = setting("en", "Keep records in this language: en | zh | all (SLAKE and LLaVA files).")
    val_fraction: float = setting(0.1, "Share of train carved into val, by image, where a release has no val split.",
                                  gt=0, lt=1)
    split_seed: int = setting(0, "Seed of the val carve.")
    image_dir: str | None = setting(None, "Image folder of the release, relative to the source or absolute.")
    verify_images: Literal["decode", "header", "exists"] = setting(
        "decode", "How images are checked at prepare time: full decode, header only, or existence.")
    view_policy: Literal["first", "each"] = setting("first", "Report datasets: one sample per study (its first "
                                                             "view) or one per view.")
    report_prompt: str = setting(DEFAULT_REPORT_PROMPT, "Report datasets: the instruction before each report.")
    revision: str | None = setting(None, "Hub sources: the commit or tag to pin.")
    cache_dir: str | None = setting(None, "Prepared copies go under <cache_dir>/datasets/<name>/ "
                                          "(default: $MEDALIGN_CACHE).")
    radgraph_model: str | None = setting(None, "Report datasets: a local RadGraph model folder for the optional "
                                               "clinical-entity F1.")
