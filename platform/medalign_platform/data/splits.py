"""The splits a ``data`` section names: lazy item views and deterministic evaluation subsets."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..common.errors import ConfigError
from .settings import SPLITS, DataSettings


class SplitItems:
    """A lazy, indexable view of a split's items (dicts from ``ConversationDataset``)."""

    def __init__(self, dataset, indices: list[int]):
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        return self.dataset[self.indices[index]]

    def image_path(self, index: int) -> str:
        return str(self.dataset.items[self.indices[index]].image_path)

    def question(self, index: int) -> str:
        """The item's question without decoding its image."""
        return self.dataset.items[self.indices[index]].question


def load_split(data: DataSettings | Mapping, split: str) -> SplitItems:
    """Items of one split, as described by the ``data`` section (typed, or its plain dict).

    ``data.<split>`` is the path of a LLaVA conversation JSON file; ``data.image_root``
    (optional) is where its relative image paths start; ``data.answer_types`` (optional)
    keeps only those answer types (e.g. ``[closed, open]`` for VQA, ``[report]``).

    Raises:
        ConfigError: the split has no file, or no item of the wanted answer types.
    """
    from .conversations import load_conversation_dataset

    data = DataSettings.from_dict(data)
    path = getattr(data, split)
    if not path:
        raise ConfigError(f"data.{split} is not set; point it at a LLaVA conversation JSON file")
    dataset = load_conversation_dataset(path, data.image_root, on_error=data.on_error,
                                        validate_images=data.validate_images)
    types = data.answer_types
    indices = [i for i, item in enumerate(dataset.items) if not types or item.answer_type in types]
    if not indices:
        raise ConfigError(f"data.{split} ({path}) has no items of data.answer_types={types}")
    return SplitItems(dataset, indices)


def evaluation_items(items: SplitItems, size: int) -> list[dict]:
    """A deterministic subset of ``size`` items (all when 0), spread over the whole split."""
    if size == 0 or size >= len(items):
        return [items[i] for i in range(len(items))]
    picks = np.linspace(0, len(items) - 1, size).round().astype(int)
    return [items[int(i)] for i in picks]
