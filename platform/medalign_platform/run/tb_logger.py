"""Rank-0 TensorBoard logging of one run: scalars, attention images, predictions, hparams."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..common.keys import flatten

NUM_ATTENTION_IMAGES = 4  # fixed val images shown at every evaluation


def hparam_value(value):
    """A TensorBoard HParams value: bools, numbers and strings stay, None is "none", others are text."""
    if isinstance(value, (bool, int, float, str)):
        return value
    return "none" if value is None else str(value)


def flat_hparams(config: dict) -> dict:
    """``{"distill/layer": 2, ...}`` from nested config sections (TensorBoard's ``/`` separator)."""
    return flatten(config, sep="/", leaf=hparam_value)


def _heatmap(values: np.ndarray) -> np.ndarray:
    """``[h, w]`` values in [0, 1] -> ``[h, w, 3]`` uint8, dark blue (low) to yellow (high)."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    low, high = np.array([20, 20, 90]), np.array([255, 230, 40])
    return (low + (high - low) * v).astype(np.uint8)


def attention_panel(image: np.ndarray, teacher: torch.Tensor, student: torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
    """The image, the teacher attention and the student attention side by side, ``[S, 3S, 3]``.

    Args:
        image: ``[S, S, 3]`` uint8.
        teacher, student: ``[H*W]`` attention maps on the student's grid.
    """
    size = image.shape[0]
    maps = []
    for values in (teacher, student):
        grid_map = values.float().reshape(1, 1, *grid)
        grid_map = grid_map / grid_map.max().clamp_min(1e-12)
        resized = F.interpolate(grid_map, size=(size, size), mode="nearest")[0, 0].numpy()
        maps.append(_heatmap(resized))
    return np.concatenate([image, *maps], axis=1)


class RunLogger:
    """Writes one run's TensorBoard events (rank 0 only).

    Args:
        log_dir: this run's event directory.
        config: the resolved run config, logged as hparams and as text.
        purge_step: when set, TensorBoard hides events of earlier event files in this folder
            at steps ``>= purge_step`` (a resumed run passes its checkpoint's step + 1, a run
            restarted from scratch 0): what a process logged after its last checkpoint and
            before it died is not shown twice.
    """

    def __init__(self, log_dir: Path, config: dict, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(str(self.log_dir), purge_step=purge_step)
        self.config = config
        self.writer.add_text("config", "```\n" + "\n".join(f"{k}: {v}" for k, v in flat_hparams(config).items()) + "\n```", 0)

    def scalars(self, step: int, metrics: dict) -> None:
        for key, value in metrics.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.writer.add_scalar(key, value, step)

    def evaluation(self, step: int, split: str, items, predictions, student_attention, teacher_attention, grid) -> None:
        """Attention panels for the first items and a table of predictions vs references."""
        for index in range(min(NUM_ATTENTION_IMAGES, len(items))):
            image = np.asarray(items[index]["image"].convert("RGB"))
            panel = attention_panel(image, teacher_attention[index], student_attention[index], grid)
            self.writer.add_image(f"{split}/attention_{index}", panel, step, dataformats="HWC")
        rows = ["| question | prediction | reference |", "| --- | --- | --- |"]
        for item, prediction in list(zip(items, predictions))[:8]:
            rows.append(f"| {item['question']} | {prediction} | {item['answer']} |")
        self.writer.add_text(f"{split}/predictions", "\n".join(rows), step)

    def hparams(self, final_metrics: dict) -> None:
        """Registers this run with the HParams dashboard.

        The metric tags point at the scalars already logged in this run, so (unlike
        ``SummaryWriter.add_hparams``) no second run directory or step-0 copies appear.
        """
        from torch.utils.tensorboard.summary import hparams

        metrics = {k: v for k, v in final_metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        params = flat_hparams({k: self.config[k] for k in ("distill", "lora", "optim", "trainer")})
        for summary in hparams(params, metrics):
            self.writer.file_writer.add_summary(summary)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
