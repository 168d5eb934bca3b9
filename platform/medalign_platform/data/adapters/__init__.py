"""Release adapters: one module per family of public releases, registered by dataset name.

``ADAPTERS[name]`` lists the layouts a dataset may come in (its own release, a parquet
mirror ...); :mod:`medalign_platform.data.prepare` picks the one ``data.source`` matches.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import llava_med, parquet, r2gen, slake, vqa_rad
from .base import Layout


@dataclass(frozen=True)
class DatasetAdapter:
    """A dataset name, its task, its layouts and how to refer users to the right one."""

    name: str
    task: str                         # vqa | report
    layouts: tuple[Layout, ...]
    languages: tuple[str, ...] = ("en",)
    mirror: str | None = None         # the parquet mirror to suggest (hf:<repo id>)


ADAPTERS: dict[str, DatasetAdapter] = {
    adapter.name: adapter
    for adapter in (
        DatasetAdapter("vqa_rad", "vqa", (vqa_rad.LAYOUT, parquet.LAYOUT), mirror="hf:flaviagiammarino/vqa-rad"),
        DatasetAdapter("slake", "vqa", (slake.LAYOUT, parquet.LAYOUT), languages=("en", "zh", "all"),
                       mirror="hf:mdwiratathya/SLAKE-vqa-english"),
        DatasetAdapter("pathvqa", "vqa", (parquet.LAYOUT,), mirror="hf:flaviagiammarino/path-vqa"),
        DatasetAdapter("iu_xray", "report", (r2gen.LAYOUT,)),
        DatasetAdapter("mimic_cxr", "report", (r2gen.LAYOUT,)),
        DatasetAdapter("llava_med", "vqa", (llava_med.LAYOUT,), languages=("en", "zh", "all")),
    )
}

__all__ = ["ADAPTERS", "DatasetAdapter"]
