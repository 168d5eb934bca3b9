"""One MedAlign run, independent of Ray: build, train, evaluate, checkpoint, resume.

The run is a plain function of a resolved config dict (:func:`run_training`). Where it
runs is the caller's business: :class:`RunContext` supplies the rank, the device and the
``report(metrics, checkpoint_dir)`` callback, which is ``ray.train.report`` inside a Ray
Train worker and a list append in a local run. That keeps this loop testable without Ray
and lets Ray Train, Tune trials and layer ablations all execute the same code.

Config sections (all plain dicts, see ``experiments/`` for the documented defaults):
``model``, ``teacher``, ``data``, ``distill``, ``lora``, ``optim``, ``trainer``.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..data.collate import StudentCollator
from ..core.objective import DistillSettings, MedAlignObjective
from ..core.student import (
    LoraSettings,
    SteerSettings,
    apply_lora,
    check_expected_layout,
    enable_gradient_checkpointing,
    load_student,
    torch_dtype,
    validate_layer,
)


@dataclass
class OptimSettings:
    """AdamW with a cosine schedule and linear warmup."""

    lr: float = field(default=2e-4, metadata={"help": "Peak learning rate (LoRA and steer alike)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    warmup_ratio: float = field(default=0.03, metadata={"help": "Share of the steps spent in linear warmup."})
    grad_clip: float = field(default=1.0, metadata={"help": "Max gradient norm; 0 disables clipping."})
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"help": "AdamW betas."})

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        if not self.lr > 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("optim.weight_decay and optim.grad_clip must be >= 0")


@dataclass
class TrainerSettings:
    """Steps, batching, evaluation and checkpoint cadence of one run."""

    max_steps: int = field(default=200, metadata={"help": "Optimiser steps."})
    batch_size: int = field(default=8, metadata={"help": "Samples per device per micro-batch."})
    grad_accum: int = field(default=1, metadata={"help": "Micro-batches per optimiser step."})
    eval_every: int = field(default=50, metadata={"help": "Evaluate on val (and checkpoint) every N steps; 0 = end only."})
    val_size: int = field(default=200, metadata={"help": "Val questions per evaluation (0 = all)."})
    test_size: int = field(default=0, metadata={"help": "Test questions at the end (0 = all)."})
    eval_batch_size: int = field(default=32, metadata={"help": "Prompts per generate() call."})
    max_new_tokens: int = field(default=16, metadata={"help": "Greedy decoding length at evaluation."})
    num_beams: int = field(default=1, metadata={"help": "Beam search width at evaluation (1 = greedy)."})
    log_every: int = field(default=10, metadata={"help": "Report training scalars every N steps."})
    seed: int = field(default=0, metadata={"help": "Seeds weights of LoRA/steer, data order and dropout."})
    precision: str = field(default="auto", metadata={"help": "auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | fp32."})
    num_threads: int = field(default=0, metadata={"help": "torch CPU threads per worker (0 = leave as is)."})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute decoder blocks in backward (non-reentrant): activation "
                                 "memory drops to about one layer input per block; a 7B step costs ~1.5x (measured on an H200)."})

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "eval_batch_size", "max_new_tokens", "num_beams"):
            if getattr(self, name) < 1:
                raise ValueError(f"trainer.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "val_size", "test_size", "log_every", "num_threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"trainer.{name} must be >= 0, got {getattr(self, name)}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"trainer.precision must be auto, bf16 or fp32, got {self.precision!r}")


def settings_from(cls, section: dict | None, name: str):
    """Builds a settings dataclass from a config section, naming unknown keys."""
    section = dict(section or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(section) - known)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in config section '{name}'; valid keys: {sorted(known)}")
    return cls(**section)


class NonFiniteLossError(RuntimeError):
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


# --------------------------------------------------------------------------- pieces


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cosine_schedule(optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the peak lr, then cosine decay to 0 (the original recipe)."""
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, warmup_steps, total_steps)


def batch_order(num_items: int, batch_size: int, seed: int, epoch: int, rank: int, world_size: int) -> list[list[int]]:
    """This rank's micro-batches for one epoch: a seeded permutation, sharded by rank.

    Deterministic in ``(seed, epoch)``, so a resumed run replays exactly the batches the
    interrupted run would have seen.
    """
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(num_items, generator=generator).tolist()
    usable = (num_items // (batch_size * world_size)) * batch_size * world_size
    if usable == 0:
        raise ValueError(f"{num_items} training items are fewer than one global batch ({batch_size} x {world_size})")
    shard = order[:usable][rank::world_size]
    return [shard[i : i + batch_size] for i in range(0, len(shard), batch_size)]


def save_checkpoint(directory: Path, model, objective: MedAlignObjective, optimizer, scheduler, state: dict) -> Path:
    """Writes adapter, steer, optimiser, scheduler and trainer state; no pickle of objects.

    ``adapter/`` loads with ``peft.PeftModel.from_pretrained``; ``steer.safetensors`` holds
    the steer weights; ``optimizer.pt`` / ``scheduler.pt`` are state dicts of tensors and
    numbers that ``torch.load(weights_only=True)`` accepts; RNG states go to
    ``rng.safetensors`` and ``trainer_state.json``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    unwrap(model).save_pretrained(directory / "adapter")
    if objective.steer is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in objective.steer.state_dict().items()},
                  directory / "steer.safetensors")
    torch.save(optimizer.state_dict(), directory / "optimizer.pt")
    torch.save(scheduler.state_dict(), directory / "scheduler.pt")
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, directory / "rng.safetensors")
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    state = {
        **state,
        "python_rng": [python_state[0], list(python_state[1]), python_state[2]],
        "numpy_rng": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
    }
    (directory / "trainer_state.json").write_text(json.dumps(state, indent=1))
    return directory


def load_checkpoint(directory: Path, model, objective: MedAlignObjective, optimizer, scheduler) -> dict:
    """Restores everything :func:`save_checkpoint` wrote; returns the trainer state."""
    from peft import set_peft_model_state_dict

    adapter = directory / "adapter"
    weights = load_file(adapter / "adapter_model.safetensors")
    set_peft_model_state_dict(unwrap(model), weights)
    if objective.steer is not None:
        objective.steer.load_state_dict(load_file(directory / "steer.safetensors"))
    optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(directory / "scheduler.pt", weights_only=True))
    rng = load_file(directory / "rng.safetensors")
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    state = json.loads((directory / "trainer_state.json").read_text())
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy_rng"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    return state


def unwrap(model):
    """The peft model under an optional DistributedDataParallel wrapper."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _autocast(device: torch.device, precision: str):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


# --------------------------------------------------------------------------- the run


@dataclass
class RunSettings:
    """The validated, typed view of one run's config."""

    model: dict
    teacher: dict
    data: dict
    distill: DistillSettings
    lora: LoraSettings
    optim: OptimSettings
    trainer: TrainerSettings

    @classmethod
    def from_config(cls, config: dict) -> "RunSettings":
        required = ("model", "teacher", "data", "distill", "lora", "optim", "trainer")
        missing = [name for name in required if name not in config]
        if missing:
            raise ValueError(f"config lacks section(s) {missing}; compose it from experiments/ (medalign train ...)")
        distill = dict(config["distill"])
        steer = settings_from(SteerSettings, distill.pop("steer", {}), "distill.steer")
        return cls(
            model=dict(config["model"]),
            teacher=dict(config["teacher"]),
            data=dict(config["data"]),
            distill=settings_from(DistillSettings, {**distill, "steer": steer}, "distill"),
            lora=settings_from(LoraSettings, config["lora"], "lora"),
            optim=settings_from(OptimSettings, config["optim"], "optim"),
            trainer=settings_from(TrainerSettings, config["trainer"], "trainer"),
        )


def run_training(config: dict, context: RunContext, evaluate: Callable | None = None) -> dict:
    """Trains one MedAlign run and returns its final metrics.

    Args:
        config: resolved plain-dict config (sections listed in the module docstring).
        context: rank, device, report callback and optional checkpoint to resume from.
        evaluate: ``evaluate(model, processor, objective, split, size) -> dict`` used at each
            evaluation; defaults to :func:`medalign_platform.run.evaluation.evaluate_split`.

    Raises:
        NonFiniteLossError: the loss became NaN or inf.
    """
    from .evaluation import TargetLookup, evaluate_split, load_split

    settings = RunSettings.from_config(config)
    trainer, optim = settings.trainer, settings.optim
    evaluate = evaluate or evaluate_split
    if trainer.num_threads:
        torch.set_num_threads(trainer.num_threads)
    started = time.perf_counter()
    seed_everything(trainer.seed)
    device = context.device

    model_cfg = settings.model
    model, processor = load_student(model_cfg["path"], attn_implementation=model_cfg.get("attn_implementation", "sdpa"),
                                    dtype=torch_dtype(model_cfg.get("dtype", "float32")))
    check_expected_layout(model, grid=model_cfg.get("grid"), vision_feature_layer=model_cfg.get("vision_feature_layer"))
    validate_layer(model, settings.distill.layer)
    model = apply_lora(model, settings.lora)
    if trainer.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    objective = MedAlignObjective(model, settings.distill)
    model.to(device)
    train_items = load_split(settings.data, "train")
    targets = TargetLookup(settings.teacher)  # reads the shared cache filled on the driver
    collator = StudentCollator(processor, max_length=int(settings.data.get("max_length", 256)),
                               prompt_template=model_cfg.get("prompt_template", "auto"))

    parameters = objective.trainable_parameters()
    optimizer = torch.optim.AdamW(parameters, lr=optim.lr, weight_decay=optim.weight_decay, betas=optim.betas)
    scheduler = cosine_schedule(optimizer, math.ceil(optim.warmup_ratio * trainer.max_steps), trainer.max_steps)
    state = {"step": 0, "evaluations": []}
    if context.resume_from is not None:
        state = load_checkpoint(Path(context.resume_from), model, objective, optimizer, scheduler)
    train_model = model
    if context.world_size > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    per_epoch = len(batch_order(len(train_items), trainer.batch_size, trainer.seed, 0, context.rank, context.world_size))
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
        totals = {"loss": 0.0, "lm": 0.0, "spatial": 0.0, "attention": 0.0}
        for accum in range(trainer.grad_accum):
            epoch, index = divmod(micro, per_epoch)
            if epoch != order_epoch:  # one permutation per epoch, not per micro-batch
                order_epoch = epoch
                order = batch_order(len(train_items), trainer.batch_size, trainer.seed, epoch, context.rank,
                                    context.world_size)
            items = [train_items[i] for i in order[index]]
            batch, _ = collator(items)
            batch = {k: v.to(device) for k, v in batch.items()}
            teacher = targets([item["image_path"] for item in items], [item["question"] for item in items]).to(device)
            sync = accum == trainer.grad_accum - 1 or not hasattr(train_model, "no_sync")
            with (nullcontext() if sync else train_model.no_sync()), _autocast(device, trainer.precision):
                terms = objective_forward(objective, train_model, batch, teacher)
            loss = terms["loss"] / trainer.grad_accum
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"non-finite loss at step {step} (lm={float(terms['lm'])}, spatial={float(terms['spatial'])}, "
                    f"attention={float(terms['attention'])}); lower optim.lr or the distillation weights"
                )
            loss.backward()
            for key in totals:
                totals[key] += float(terms[key].detach()) / trainer.grad_accum
            micro += 1
            samples += len(items) * context.world_size
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, optim.grad_clip if optim.grad_clip > 0 else float("inf"))
        optimizer.step()
        scheduler.step()
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
                checkpoint = save_checkpoint(Path(context.scratch_dir) / f"checkpoint-{step:06d}", model, objective,
                                             optimizer, scheduler, state)
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
