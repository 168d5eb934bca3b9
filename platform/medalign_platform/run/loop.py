"""One MedAlign run, independent of Ray: build, train, evaluate, checkpoint, resume.

The run is a plain function of a run config (:func:`run_training`). Where it runs is the
caller's business: :class:`RunContext` supplies the rank, the device and the
``report(metrics, checkpoint_dir)`` callback, which is ``ray.train.report`` inside a Ray
Train worker, ``ray.tune.report`` in an inline sweep trial and a list append in a local
run (:mod:`medalign_platform.run.runner` sets both Ray cases up). That keeps this loop
testable without Ray and lets Ray Train, Tune trials and layer ablations all execute the
same code.

:func:`run_training` is :func:`build_run` (student in ``model.dtype`` with LoRA, the tap,
optional gradient checkpointing and ``torch.compile``; optimiser; the input pipeline of
:mod:`medalign_platform.run.data_pipeline`) then :func:`train`. A step
(:func:`train_step`) reads nothing back to the host: loss terms accumulate on the device
and a :class:`NonFiniteWatch` remembers a NaN/inf loss there; both reach the host at log
and evaluation steps only (``benchmarks/loop_bench.py`` times the loop against the bare step).
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
from .acceleration import autocast, compile_blocks, eager
from .checkpoint import load_checkpoint, save_checkpoint
from .data_pipeline import (
    MicroBatchSampler,
    TrainCollate,
    TrainItems,
    available_cpus,
    resolve_data_workers,
    train_loader,
)
from .optimization import clip_and_step, cosine_schedule, seed_everything
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
            (fault injection in tests, timing in benchmarks).
        cpus: CPUs this process holds (caps ``trainer.data_workers``); None: read them
            (:func:`~medalign_platform.run.data_pipeline.available_cpus`).
        student: optional ``(settings, dtype) -> (model, processor)`` instead of loading
            ``model.path`` (benchmarks build random models of a given shape this way).
        targets: optional teacher-target lookup instead of
            :class:`~medalign_platform.run.evaluation.TargetLookup` of the ``teacher`` section.
    """

    report: Callable[[dict, Path | None], None]
    resume_from: Path | None = None
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    scratch_dir: Path | None = None
    logger: Any = None
    after_step: Callable[[int], None] | None = None
    cpus: float | None = None
    student: Callable[[RunSettings, torch.dtype], tuple] | None = None
    targets: Any = None


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


class NonFiniteWatch:
    """Remembers on the device the first step whose loss was NaN/inf, and its terms.

    Nothing reaches the host until :meth:`check` (at log and evaluation steps), so a step
    holds no device-to-host sync; the run stops at the first check after the bad step.
    """

    def __init__(self, names: list[str], device: torch.device):
        self.names = names
        self.first_step = torch.full((), -1, dtype=torch.long, device=device)
        self.terms = torch.zeros(len(names), device=device)

    def observe(self, step: int, loss: torch.Tensor, values: torch.Tensor) -> None:
        new = ~torch.isfinite(loss.detach()) & (self.first_step < 0)
        self.first_step = torch.where(new, step, self.first_step)
        self.terms = torch.where(new, values, self.terms)

    def check(self, now: int) -> None:
        """Raises :class:`NonFiniteLossError` if any step so far had a non-finite loss."""
        first = int(self.first_step)
        if first >= 0:
            shown = ", ".join(f"{name}={value}" for name, value in zip(self.names, self.terms.tolist()))
            raise NonFiniteLossError(
                f"non-finite loss at step {first} ({shown}; checked after step {now}); lower optim.lr or the "
                "distillation weights")


@dataclass
class RunParts:
    """Everything a run's loop works with, built once by :func:`build_run`."""

    settings: RunSettings
    context: RunContext
    dtype: torch.dtype
    model: Any
    train_model: Any
    processor: Any
    objective: MedAlignObjective
    parameters: list
    optimizer: torch.optim.Optimizer
    scheduler: Any
    targets: Any
    items: TrainItems
    collate: TrainCollate
    data_workers: int
    state: dict
    started: float
    setup_seconds: float = 0.0

    @property
    def device(self) -> torch.device:
        return self.context.device

    def micro_batches(self, start: int, stop: int):
        """The DataLoader of this rank's micro-batches ``start .. stop-1``."""
        trainer = self.settings.trainer
        sampler = MicroBatchSampler(len(self.items), trainer.batch_size, trainer.seed, start=start, stop=stop,
                                    rank=self.context.rank, world_size=self.context.world_size)
        return train_loader(self.items, self.collate, sampler, workers=self.data_workers,
                            prefetch=trainer.prefetch_batches, pin_memory=self.device.type == "cuda",
                            seed=trainer.seed)


def build_run(settings: RunSettings, context: RunContext) -> RunParts:
    """Builds the student (dtype, LoRA, tap, checkpointing, compile), optimiser, data and state."""
    from ..data.splits import load_split
    from .evaluation import TargetLookup

    trainer, optim = settings.trainer, settings.optim
    if trainer.num_threads:
        torch.set_num_threads(trainer.num_threads)
    started = time.perf_counter()
    seed_everything(trainer.seed)
    device = context.device
    model_cfg = settings.model
    dtype = torch_dtype(model_cfg.dtype, device)

    if context.student is not None:
        model, processor = context.student(settings, dtype)
    else:
        model, processor = load_student(model_cfg.path, dtype=dtype, attn_implementation=model_cfg.attn_implementation)
    check_expected_layout(model, grid=model_cfg.grid, vision_feature_layer=model_cfg.vision_feature_layer)
    model = apply_lora(model, settings.lora)
    objective = MedAlignObjective(model, settings.distill)  # checks the layer against the loaded model
    if trainer.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if trainer.compile:
        compile_blocks(model)  # after the tap: dynamo does not guard on hooks added later
    model.to(device)
    targets = context.targets if context.targets is not None else TargetLookup(settings.teacher)
    items = TrainItems(load_split(settings.data, "train"))
    collate = TrainCollate(
        StudentCollator(processor, max_length=settings.data.max_length, prompt_template=model_cfg.prompt_template),
        targets if objective.active else None,  # forked workers share the loaded teacher
        objective.tap.locator())
    cpus = context.cpus if context.cpus is not None else available_cpus()
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
    parts = RunParts(settings=settings, context=context, dtype=dtype, model=model, train_model=train_model,
                     processor=processor, objective=objective, parameters=parameters, optimizer=optimizer,
                     scheduler=scheduler, targets=targets, items=items, collate=collate,
                     data_workers=resolve_data_workers(trainer.data_workers, cpus), state=state, started=started)
    parts.setup_seconds = time.perf_counter() - started
    return parts


def train_step(parts: RunParts, micro_batches, step: int, watch: NonFiniteWatch | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One optimiser step over ``grad_accum`` micro-batches, without reading anything back to the host.

    Args:
        micro_batches: an iterator of :class:`~medalign_platform.run.data_pipeline.TrainBatch`
            (on the CPU, or already on the device).
        step: the 0-based step (for the non-finite watch).

    Returns:
        ``(terms, grad_norm, samples)``: the step's mean ``[loss, *term_names]`` and gradient
        norm as device tensors, and this rank's sample count.
    """
    trainer = parts.settings.trainer
    objective, train_model = parts.objective, parts.train_model
    accum = trainer.grad_accum
    parts.optimizer.zero_grad(set_to_none=True)
    totals = None
    samples = 0
    for index in range(accum):
        batch = next(micro_batches).to(parts.device, parts.dtype)
        objective.tap.expect(batch.span)
        sync = index == accum - 1 or not hasattr(train_model, "no_sync")
        with (nullcontext() if sync else train_model.no_sync()), autocast(parts.device, trainer.precision):
            terms = objective_forward(objective, train_model, batch.inputs, batch.teacher)
        (terms["loss"] / accum).backward()
        values = torch.stack([terms["loss"].detach().float(), *(terms[name].float() for name in objective.term_names)])
        if watch is not None:
            watch.observe(step, terms["loss"], values)
        totals = values / accum if totals is None else totals + values / accum
        samples += batch.size
    grad_norm = clip_and_step(parts.parameters, parts.optimizer, parts.scheduler, parts.settings.optim.grad_clip)
    return totals, grad_norm, samples


class _Timed:
    """An iterator wrapper that adds the seconds spent waiting for the next item to ``seconds``."""

    def __init__(self, iterator):
        self.iterator, self.seconds = iterator, 0.0

    def __next__(self):
        tick = time.perf_counter()
        try:
            return next(self.iterator)
        finally:
            self.seconds += time.perf_counter() - tick


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
    settings = config if isinstance(config, RunSettings) else RunSettings.from_config(config)
    parts = build_run(settings, context)
    try:
        return train(parts, evaluate)
    finally:
        parts.objective.remove()


def train(parts: RunParts, evaluate: Callable | None = None) -> dict:
    """The training loop of a built run: steps, logs, evaluations and checkpoints until ``max_steps``."""
    from .evaluation import evaluate_split

    settings, context = parts.settings, parts.context
    trainer = settings.trainer
    evaluate = evaluate or evaluate_split
    model, objective, state = parts.model, parts.objective, parts.state
    step = start_step = state["step"]
    watch = NonFiniteWatch(["loss", *objective.term_names], parts.device)
    loader = parts.micro_batches(step * trainer.grad_accum, trainer.max_steps * trainer.grad_accum)
    iterator = iter(loader)
    batches = _Timed(iterator)
    loop_seconds, samples = 0.0, 0
    model.train()
    last_metrics: dict = {}
    try:
        while step < trainer.max_steps:
            tick = time.perf_counter()
            totals, grad_norm, count = train_step(parts, batches, step, watch)
            samples += count * context.world_size
            step += 1
            loop_seconds += time.perf_counter() - tick

            last_step = step == trainer.max_steps
            evaluate_now = (trainer.eval_every and step % trainer.eval_every == 0) or last_step
            log_now = evaluate_now or step % max(trainer.log_every, 1) == 0
            if not log_now:
                if context.after_step is not None:
                    context.after_step(step)
                continue
            tick = time.perf_counter()
            watch.check(step)  # before anything is evaluated or checkpointed
            names = ["loss", *objective.term_names]
            metrics = {**{f"train/{k}": v for k, v in zip(names, totals.tolist())},
                       "train/lr": parts.scheduler.get_last_lr()[0], "train/grad_norm": float(grad_norm),
                       "step": step}
            loop_seconds += time.perf_counter() - tick  # the log step's one sync is part of the loop
            checkpoint = None
            if evaluate_now:
                state, checkpoint = _evaluate_and_checkpoint(parts, evaluate, step, last_step, metrics)
                parts.state = state
            wall = time.perf_counter() - parts.started
            metrics.update({
                "perf/samples_per_s": samples / max(loop_seconds, 1e-9),
                "perf/outside_loop_share": 1.0 - loop_seconds / max(wall, 1e-9),
                "perf/data_wait_share": batches.seconds / max(loop_seconds, 1e-9),
                "perf/data_workers": parts.data_workers,
                "perf/setup_s": parts.setup_seconds,
                "perf/start_step": start_step,  # > 0: this process resumed from a checkpoint
            })
            if context.logger is not None:
                context.logger.scalars(step, metrics)
            context.report(metrics, checkpoint)
            last_metrics = metrics
            if context.after_step is not None:
                context.after_step(step)
    finally:
        # The workers end with the loop, also on an error (whose traceback would keep the
        # iterator, and so the worker processes, alive until it is collected).
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
    if context.logger is not None:
        context.logger.hparams({k: v for k, v in last_metrics.items() if k.startswith(("val/", "test/"))})
    return last_metrics


def _evaluate_and_checkpoint(parts: RunParts, evaluate: Callable, step: int, last_step: bool, metrics: dict):
    """Rank 0 evaluates (eager, in the student's dtype) and writes the checkpoint; returns (state, folder)."""
    context, model, objective = parts.context, parts.model, parts.objective
    tick = time.perf_counter()
    predictions: dict = {}
    if context.rank == 0:  # generation needs no collectives, so other ranks just wait
        model.eval()
        try:
            with eager():
                for split in ("val", "test") if last_step else ("val",):
                    on_predictions = _log_predictions(context.logger, parts.targets, objective, step, split,
                                                      predictions)
                    results = evaluate(model, parts.processor, objective, parts.settings, split,
                                       on_predictions=on_predictions)
                    metrics.update({f"{split}/{k}": v for k, v in results.items()})
        finally:
            model.train()
    metrics["perf/eval_s"] = time.perf_counter() - tick
    state = {"step": step, "evaluations": [*parts.state["evaluations"], step]}
    checkpoint = None
    if context.rank == 0 and context.scratch_dir is not None:
        checkpoint = save_checkpoint(Path(context.scratch_dir) / f"checkpoint-{step:06d}", model,
                                     objective.steer, parts.optimizer, parts.scheduler, state)
        (checkpoint / "predictions.json").write_text(json.dumps(predictions, indent=1))
    return state, checkpoint


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
