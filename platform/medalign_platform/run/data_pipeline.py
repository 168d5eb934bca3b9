"""The training input pipeline: micro-batches prepared off the training process, in replayable order.

A ``torch.utils.data.DataLoader`` whose worker processes do everything a micro-batch needs
before the device: decode the images (:class:`TrainItems`, no lesion masks: only evaluation
reads them), run the student's processor and collator, look up the teacher targets in the
shared cache, and locate the visual span and text queries on the CPU
(:class:`TrainCollate`). The training process only copies the pinned result to the device
(non-blocking) and runs the step. ``trainer.data_workers`` processes prepare
``trainer.prefetch_batches`` micro-batches each ahead of the step; 0 runs the same code
in the training process.

Order: :class:`MicroBatchSampler` yields this rank's micro-batches of the whole run, from
micro-batch ``start`` on, each epoch a seeded permutation sharded by rank
(:func:`~medalign_platform.run.optimization.epoch_batches`). A run resumed at step ``s``
starts at micro-batch ``s * grad_accum`` and sees exactly the batches the uninterrupted
run saw; the loader draws its worker seeds from its own generator, so creating it does
not move the global RNG that LoRA dropout uses.

CPU counts: worker processes are capped at the CPUs the training process holds minus one
(:func:`available_cpus`: Ray's CPU resources inside a Ray Train worker or an inline Tune
trial, the affinity mask elsewhere), so a 1-CPU Ray worker reads in-process rather than
oversubscribing its node.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from ..core.tap import SpanLayout, SpanLocator
from ..core.teacher import TeacherOutputs
from ..data.collate import StudentCollator
from ..data.splits import SplitItems
from .optimization import epoch_batches

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- items and order


class TrainItems(Dataset):
    """A split's training items as the collator needs them: image decoded, no mask read.

    Args:
        split: the split's items (:func:`~medalign_platform.data.splits.load_split`).
    """

    def __init__(self, split: SplitItems):
        self.records = [split.dataset.items[i] for i in split.indices]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        with Image.open(record.image_path) as im:
            image = im.convert("RGB")
        return {"id": record.id, "turn": record.turn, "image": image, "image_path": str(record.image_path),
                "question": record.question, "answer": record.answer, "answer_type": record.answer_type}


class MicroBatchSampler(Sampler[list[int]]):
    """This rank's micro-batches ``start .. stop-1`` of a run, in the run's replayable order.

    Micro-batch ``m`` is batch ``m % per_epoch`` of epoch ``m // per_epoch``'s permutation.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, *, start: int, stop: int, rank: int = 0,
                 world_size: int = 1):
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.start, self.stop = start, stop
        self.per_epoch = len(self._epoch(0))

    def _epoch(self, epoch: int) -> list[list[int]]:
        return epoch_batches(self.num_items, self.batch_size, self.seed, epoch, self.rank, self.world_size)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        order_epoch, order = -1, []
        for micro in range(self.start, self.stop):
            epoch, index = divmod(micro, self.per_epoch)
            if epoch != order_epoch:  # one permutation per epoch, not per micro-batch
                order_epoch, order = epoch, self._epoch(epoch)
            yield order[index]


# --------------------------------------------------------------------------- batches


@dataclass
class TrainBatch:
    """One micro-batch, ready for the step.

    Attributes:
        inputs: ``input_ids``, ``attention_mask``, ``labels`` ``[B, T]``, ``pixel_values [B, 3, S, S]``.
        teacher: native-grid teacher targets (None when no distillation term is active).
        span: the visual span and text queries, located on the CPU (None: the tap locates them).
        size: ``B``.
    """

    inputs: dict[str, torch.Tensor]
    teacher: TeacherOutputs | None
    span: SpanLayout | None
    size: int

    def pin_memory(self) -> "TrainBatch":
        """Pinned copy (``DataLoader(pin_memory=True)`` calls it), so the copy to the GPU is asynchronous."""
        teacher = self.teacher
        if teacher is not None:
            prompt = teacher.prompt_attention
            teacher = TeacherOutputs(teacher.patch_tokens.pin_memory(), teacher.cls_attention.pin_memory(),
                                     teacher.grid, None if prompt is None else prompt.pin_memory())
        return TrainBatch({k: v.pin_memory() for k, v in self.inputs.items()}, teacher,
                          None if self.span is None else self.span.pin_memory(), self.size)

    def to(self, device: torch.device, pixel_dtype: torch.dtype | None = None) -> "TrainBatch":
        """On ``device`` (non-blocking), pixels in the student's dtype."""
        inputs = {k: v.to(device, non_blocking=True) for k, v in self.inputs.items()}
        if pixel_dtype is not None:
            inputs["pixel_values"] = inputs["pixel_values"].to(pixel_dtype)
        teacher = self.teacher
        if teacher is not None:
            prompt = teacher.prompt_attention
            teacher = TeacherOutputs(teacher.patch_tokens.to(device, non_blocking=True),
                                     teacher.cls_attention.to(device, non_blocking=True), teacher.grid,
                                     None if prompt is None else prompt.to(device, non_blocking=True))
        span = None if self.span is None else self.span.to(device, non_blocking=True)
        return TrainBatch(inputs, teacher, span, self.size)


class TrainCollate:
    """Items -> :class:`TrainBatch`: processor and collator, teacher-target lookup, span layout.

    Runs in the data-loader workers (or in the training process with 0 workers).

    Args:
        collator: the training :class:`~medalign_platform.data.collate.StudentCollator`.
        targets: ``(image paths, questions) -> TeacherOutputs`` (the run's
            :class:`~medalign_platform.run.evaluation.TargetLookup`), or None.
        locator: the tap's :class:`~medalign_platform.core.tap.SpanLocator`, or None.
    """

    def __init__(self, collator: StudentCollator,
                 targets: Callable[[Sequence[str], Sequence[str]], TeacherOutputs] | None,
                 locator: SpanLocator | None):
        self.collator, self.targets, self.locator = collator, targets, locator

    def __call__(self, items: list[dict]) -> TrainBatch:
        inputs, _ = self.collator(items)
        teacher = None
        if self.targets is not None:  # questions matter only to prompt-aware targets
            teacher = self.targets([item["image_path"] for item in items], [item["question"] for item in items])
        span = None
        if self.locator is not None:
            span = self.locator(inputs["input_ids"], inputs["attention_mask"], inputs.get("labels"))
        return TrainBatch(inputs, teacher, span, len(items))


# --------------------------------------------------------------------------- the loader


def available_cpus() -> float:
    """CPUs this process may use: its Ray CPU resources inside a Ray worker, else its affinity mask."""
    ray = sys.modules.get("ray")  # only when Ray is already loaded: never import it for this
    if ray is not None and ray.is_initialized():
        try:
            context = ray.get_runtime_context()
            if context.worker.mode == ray._private.worker.WORKER_MODE:
                return float(context.get_assigned_resources().get("CPU", 0.0))
        except Exception as error:  # an older or newer Ray without these internals
            logger.debug("could not read this worker's Ray CPU resources: %s", error)
    if hasattr(os, "sched_getaffinity"):
        return float(len(os.sched_getaffinity(0)))
    return float(os.cpu_count() or 1)


def resolve_data_workers(requested: int, cpus: float) -> int:
    """``trainer.data_workers`` capped at the CPUs held minus one (the training process's own)."""
    allowed = max(0, int(cpus) - 1)
    if requested > allowed:
        logger.warning("trainer.data_workers=%d capped to %d: this process holds %g CPU(s) (inside Ray: "
                       "ray.resources_per_worker.CPU or sweep.trial_resources.CPU); give it more to read in parallel",
                       requested, allowed, cpus)
    return min(requested, allowed)


def train_loader(items: TrainItems, collate: TrainCollate, sampler: MicroBatchSampler, *, workers: int,
                 prefetch: int, pin_memory: bool, seed: int) -> DataLoader:
    """The DataLoader over ``sampler``'s micro-batches.

    Args:
        workers: worker processes (0: in the training process).
        prefetch: micro-batches each worker prepares ahead.
        pin_memory: page-locked batches (for an asynchronous copy to a GPU).
        seed: seeds the loader's own generator (worker seeds), leaving the global RNG alone.
    """
    return DataLoader(
        items, batch_sampler=sampler, collate_fn=collate, num_workers=workers, pin_memory=pin_memory,
        prefetch_factor=prefetch if workers > 0 else None, persistent_workers=False,
        generator=torch.Generator().manual_seed(seed),
    )
