"""Pieces every training loop of the platform shares: seeding, batch order, schedule, step.

The MedAlign run loop (:mod:`medalign_platform.run.loop`) and the two SynthMed builders
(the tiny expert CLIP and base LVLM) each keep their own short loop, since what they do
per step differs (distillation terms, contrastive loss, full fine-tune), but take their
seeding, epoch order, learning-rate schedule and optimiser step from here.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seeds Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cosine_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                    min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the peak lr, then cosine decay to ``min_lr_ratio * lr``.

    transformers' schedulers (the original recipe's): step ``s`` of warmup runs at
    ``lr * s / warmup_steps``, so the first step's lr is 0.
    """
    from transformers import get_cosine_schedule_with_warmup, get_cosine_with_min_lr_schedule_with_warmup

    if min_lr_ratio == 0:
        return get_cosine_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    return get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup_steps, total_steps,
                                                       min_lr_rate=min_lr_ratio)


def warmup_cosine_lr(step: int, total_steps: int, peak: float, warmup_steps: int, floor: float = 0.0) -> float:
    """The learning rate at 0-based ``step``: warmup reaching ``peak`` at step ``warmup_steps - 1``,
    then cosine decay to ``floor * peak`` (for loops that set the lr themselves each step)."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def epoch_batches(num_items: int, batch_size: int, seed: int, epoch: int, rank: int = 0,
                  world_size: int = 1, generator: torch.Generator | None = None) -> list[list[int]]:
    """This rank's micro-batches for one epoch: a seeded permutation, sharded by rank.

    Deterministic in ``(seed, epoch)``, so a resumed run replays exactly the batches the
    interrupted run would have seen. The epoch's ragged tail (fewer than one global batch)
    is dropped so every step has the same shape on every rank.

    Args:
        generator: draw the permutation from this generator (advancing it) instead of one
            seeded from ``(seed, epoch)``. For loops that never resume (the SynthMed expert
            CLIP): one generator seeded once and drawn epoch after epoch keeps the batch
            order, and so the prepared weights, of builds made before this function existed.

    Raises:
        ValueError: fewer items than one global batch.
    """
    if generator is None:
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(num_items, generator=generator).tolist()
    usable = (num_items // (batch_size * world_size)) * batch_size * world_size
    if usable == 0:
        raise ValueError(f"{num_items} training items are fewer than one global batch ({batch_size} x {world_size})")
    shard = order[:usable][rank::world_size]
    return [shard[i: i + batch_size] for i in range(0, len(shard), batch_size)]


def clip_and_step(parameters, optimizer: torch.optim.Optimizer, scheduler, grad_clip: float) -> torch.Tensor:
    """Clips the gradient norm (``grad_clip`` 0: no clipping), steps optimiser and schedule.

    Returns:
        the total gradient norm before clipping (a 0-dim tensor, on the parameters' device).
    """
    norm = torch.nn.utils.clip_grad_norm_(parameters, grad_clip if grad_clip > 0 else float("inf"))
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return norm
