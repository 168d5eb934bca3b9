"""One MedAlign run, independent of Ray: build, train, evaluate, checkpoint, resume.

The run is a plain function of a run config (:func:`run_training`). Where it runs is the
caller's business: :class:`RunContext` supplies the rank, the device and the
``report(metrics, checkpoint_dir)`` callback, which is ``ray.train.report`` inside a Ray
Train worker, ``ray.tune.report`` in an inline sweep trial and a list append in a local
run (:mod:`medalign_platform.run.runner` sets both Ray cases up). That keeps this loop
testable without Ray and lets Ray Train, Tune trials and layer ablations all execute the
same code.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..common.errors import MedAlignError
from ..core.objective import MedAlignObjective
from ..core.student import apply_lora, check_expected_layout, enable_gradient_checkpointing, load_student, torch_dtype
from ..data.collate import StudentCollator
from .checkpoint import load_checkpoint, save_checkpoint
from .optimization import clip_and_step, cosine_schedule, epoch_batches, seed_everything
from .settings import RunSettings


class NonFiniteLossError(MedAlignError, RuntimeError):
    """The loss became NaN or inf: the run stops instead of training on garbage."""


@dataclass
class RunContext:
    """What the environment gives a run.

    Attributes:
        report: called with ``(metrics, checkpoint_dir_or_None)`` at every log/eval point on
            every rank (Ray Train requires all ranks to report); only rank 0 passes a
            checkpoint directory.
        resume_from: a checkpoint directory to continue from, or None.
        rank / world_size: data-parallel position (``torch.distributed`` must already be
            initialised when ``world_size > 1``).
        device: where this rank computes.
        scratch_dir: where checkpoints are written before they are reported.
        logger: optional rank-0 logger with ``scalars(step, dict)`` etc. (TensorBoard).
        after_step: optional callback ``(step)`` after each optimiser step's report
            (fault injection in tests).
    """

    report: Callable[[dict, Path | None], None]
    resume_from: Path | None = None
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    scratch_dir: Path | None = None
    logger: Any = None
    after_step: Callable[[int], None] | None = None


def _autocast(device: torch.device, precision: str):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def objective_forward(objective: MedAlignObjective, train_model, batch: dict, teacher) -> dict:
    """Runs the objective through ``train_model`` (the DDP wrapper when distributed)."""
    if train_model is objective.model:
        return objective(batch, teacher)
    original = objective.model
    objective.model = train_model  # DDP forwards to the same module, so the tap still fires
    try:
        return objective(batch, teacher)
    finally:
        objective.model = original


def run_training(config: Mapping | RunSettings, context: RunContext, evaluate: Callable | None = None) -> dict:
    """Trains one MedAlign run and returns its final metrics.

    Args:
        config: the run config (a plain dict, typed here once) or its :class:`RunSettings`.
        context: rank, device, report callback and optional checkpoint to resume from.
        evaluate: ``evaluate(model, processor, objective, settings, split, on_predictions) -> dict``
            used at each evaluation; defaults to :func:`medalign_platform.run.evaluation.evaluate_split`.

    Raises:
        NonFiniteLossError: the loss became NaN or inf.
    """
    from ..data.splits import load_split
    from .evaluation import TargetLookup, evaluate_split

    settings = config if isinstance(config, RunSettings) else RunSettings.from_config(config)
    trainer, optim = settings.trainer, settings.optim
    evaluate = evaluate or evaluate_split
    if trainer.num_threads:
        torch.set_num_threads(trainer.num_threads)
    started = time.perf_counter()
    seed_everything(trainer.seed)
    device = context.device

    model_cfg = settings.model
    model, processor = load_student(model_cfg.path, attn_implementation=model_cfg.attn_implementation,
                                    dtype=torch_dtype(model_cfg.dtype))
    check_expected_layout(model, grid=model_cfg.grid, vision_feature_layer=model_cfg.vision_feature_layer)
    model = apply_lora(model, settings.lora)
    if trainer.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    objective = MedAlignObjective(model, settings.distill)  # checks the layer against the loaded model
    model.to(device)
    train_items = load_split(settings.data, "train")
    targets = TargetLookup(settings.teacher)  # reads the shared cache filled on the driver
    collator = StudentCollator(processor, max_length=settings.data.max_length, prompt_template=model_cfg.prompt_template)

    parameters = objective.trainable_parameters()
    optimizer = torch.optim.AdamW(parameters, lr=optim.lr, weight_decay=optim.weight_decay, betas=optim.betas)
    scheduler = cosine_schedule(optimizer, math.ceil(optim.warmup_ratio * trainer.max_steps), trainer.max_steps)
    state = {"step": 0, "evaluations": []}
    if context.resume_from is not None:
        state = load_checkpoint(Path(context.resume_from), model, objective.steer, optimizer, scheduler)
    train_model = model
    if context.world_size > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    def batches_of(epoch: int) -> list[list[int]]:
        return epoch_batches(len(train_items), trainer.batch_size, trainer.seed, epoch, context.rank,
                             context.world_size)

    per_epoch = len(batches_of(0))
    step = start_step = state["step"]
    micro = step * trainer.grad_accum  # micro-batches consumed so far, for the exact data position
    loop_seconds, samples = 0.0, 0
    order_epoch, order = -1, []
    setup_seconds = time.perf_counter() - started
    model.train()
    last_metrics: dict = {}
    while step < trainer.max_steps:
        tick = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        totals = {name: 0.0 for name in ("loss", *objective.term_names)}
        for accum in range(trainer.grad_accum):
            epoch, index = divmod(micro, per_epoch)
            if epoch != order_epoch:  # one permutation per epoch, not per micro-batch
                order_epoch, order = epoch, batches_of(epoch)
            items = [train_items[i] for i in order[index]]
            batch, _ = collator(items)
            batch = {k: v.to(device) for k, v in batch.items()}
            teacher = targets([item["image_path"] for item in items], [item["question"] for item in items]).to(device)
            sync = accum == trainer.grad_accum - 1 or not hasattr(train_model, "no_sync")
            with (nullcontext() if sync else train_model.no_sync()), _autocast(device, trainer.precision):
                terms = objective_forward(objective, train_model, batch, teacher)
            loss = terms["loss"] / trainer.grad_accum
            if not torch.isfinite(loss):
                shown = ", ".join(f"{name}={float(terms[name])}" for name in objective.term_names)
                raise NonFiniteLossError(
                    f"non-finite loss at step {step} ({shown}); lower optim.lr or the distillation weights")
            loss.backward()
            for key in totals:
                totals[key] += float(terms[key].detach()) / trainer.grad_accum
            micro += 1
            samples += len(items) * context.world_size
        grad_norm = clip_and_step(parameters, optimizer, scheduler, optim.grad_clip)
        step += 1
        loop_seconds += time.perf_counter() - tick

        metrics = {**{f"train/{k}": v for k, v in totals.items()}, "train/lr": scheduler.get_last_lr()[0],
                   "train/grad_norm": float(grad_norm), "step": step}
        last_step = step == trainer.max_steps
        evaluate_now = (trainer.eval_every and step % trainer.eval_every == 0) or last_step
        checkpoint = None
        if evaluate_now:
            tick = time.perf_counter()
            if context.rank == 0:  # generation needs no collectives, so other ranks just wait
                model.eval()
                predictions = {}
                for split in ("val", "test") if last_step else ("val",):
                    on_predictions = _log_predictions(context.logger, targets, objective, step, split, predictions)
                    results = evaluate(model, processor, objective, settings, split, on_predictions=on_predictions)
                    metrics.update({f"{split}/{k}": v for k, v in results.items()})
                model.train()
            metrics["perf/eval_s"] = time.perf_counter() - tick
            state = {"step": step, "evaluations": [*state["evaluations"], step]}
            if context.rank == 0 and context.scratch_dir is not None:
                checkpoint = save_checkpoint(Path(context.scratch_dir) / f"checkpoint-{step:06d}", model,
                                             objective.steer, optimizer, scheduler, state)
                (checkpoint / "predictions.json").write_text(json.dumps(predictions, indent=1))
        if evaluate_now or step % max(trainer.log_every, 1) == 0:
            wall = time.perf_counter() - started
            metrics.update({
                "perf/samples_per_s": samples / max(loop_seconds, 1e-9),
                "perf/outside_loop_share": 1.0 - loop_seconds / max(wall, 1e-9),
                "perf/setup_s": setup_seconds,
                "perf/start_step": start_step,  # > 0: this process resumed from a checkpoint
            })
            if context.logger is not None:
                context.logger.scalars(step, metrics)
            context.report(metrics, checkpoint)
            last_metrics = metrics
        if context.after_step is not None:
            context.after_step(step)
    if context.logger is not None:
        context.logger.hparams({k: v for k, v in last_metrics.items() if k.startswith(("val/", "test/"))})
    objective.remove()
    return last_metrics


def _log_predictions(logger, targets, objective: MedAlignObjective, step: int, split: str, predictions: dict):
    """An evaluation callback: keeps the predictions and draws TensorBoard panels."""
    from ..core.losses import teacher_attention_map

    def log(items, answers, student_attention):
        predictions[split] = [{"id": item["id"], "prediction": answer} for item, answer in zip(items, answers)]
        if logger is None:
            return
        shown = items[:4]
        teacher = targets([item["image_path"] for item in shown], [item["question"] for item in shown])
        # The only place distill.teacher_max_normalize matters: how the panel scales the map.
        teacher_attention = teacher_attention_map(teacher.attention, teacher.grid, objective.student_grid,
                                                  max_normalize=objective.settings.teacher_max_normalize)
        logger.evaluation(step, split, items, answers, student_attention, teacher_attention, objective.student_grid)

    return log
