"""The tiny base LVLM of the SynthMed embedded default: a tiny LLaVA pre-trained on SynthMed.

MedAlign starts from a Med-LVLM that already answers medical questions in the right format
but grounds imperfectly. For the embedded default that model is built here in about a
minute on a laptop CPU:

1. :func:`medalign_platform.synthmed.tiny_student.tiny_student` builds a random LLaVA with a
   word-level tokenizer over :data:`~medalign_platform.synthmed.generator.SYNTHMED_WORDS` plus the two
   chat words of the prompt (``user``, ``assistant``; punctuation and digits are always in
   that tokenizer).
2. It is trained briefly with a **full fine-tune** -- vision tower, projector and LLM, like
   an LVLM's instruction stage -- on SynthMed's train split: every closed (yes/no) and open
   VQA question and every report ("describe the findings."), in the one prompt format of
   :mod:`medalign_platform.data.collate`, loss on the answer tokens only.
3. It is saved with ``save_pretrained`` (model and processor), loads back through
   :func:`medalign_platform.core.student.load_student`, and ``training.json`` records the
   settings, the loss and validation metrics (greedy answers scored by the run's
   :func:`medalign_platform.run.evaluation.evaluate_items`, see :func:`validation_metrics`).

Architecture (see :data:`DEFAULT_ARCHITECTURE`): SynthMed images are 64 px, so the image
processor keeps them at **64 px** (no resampling, nothing lost) and the CLIP vision tower cuts
**8 px patches**, an **8x8 visual grid** (64 image tokens, the grid of the default tiny
student). The LLM is tiny_student's 4-layer Llama of width 64 (grouped-query attention, 4
query and 2 key/value heads), so MedAlign's distillation layer can be 1, 2 or 3; the vision
tower has 3 layers of width 64 (LLaVA reads the second-to-last, so 2 of them are used).
A wider, deeper LLM (width 96, 6 layers) is about twice as slow per step, which the ~90 s
budget cannot afford.

Two things make such a small model learn to look at the image within a few hundred steps
(with HF's default init it still answered from the text prior after 800 steps in our runs):
:func:`init_small_width` (fan-in init instead of ``initializer_range=0.02``, which suits
widths of thousands, and larger CLIP position embeddings), and :func:`answer_loss` (every
question weighs the same, so reports do not drown the one-token closed answers).

The training budget is deliberately short (400 steps of 32, ~12.8k samples, about a quarter
of one epoch of the default train split): the model learns the answer format (yes/no for
closed questions, short phrases for open ones, reports in the template) and part of the
grounding, so validation closed accuracy lands clearly above the text-only prior (~53-55%
on SynthMed's val split) but well below 100% (about 60-72% across seeds), leaving room for
MedAlign. ``training.json`` holds the numbers of each build.

Determinism: the weights are a function of ``seed`` (and the data), with a fixed number of
CPU threads (``num_threads``, 1 by default, which also keeps a run's time predictable on
machines whose cores are shared). ``ensure_base_lvlm`` reuses an existing build whose
settings and data match.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..common.atomic import move_into_place, replaceable
from ..data.collate import PROMPT_TEMPLATE, StudentCollator
from ..run.optimization import warmup_cosine_lr
from .generator import SYNTHMED_WORDS, load_manifest

__all__ = [
    "BASE_LVLM_VERSION",
    "CHAT_WORDS",
    "DEFAULT_ARCHITECTURE",
    "DEFAULT_TRAINING",
    "answer_loss",
    "base_lvlm_words",
    "ensure_base_lvlm",
    "init_small_width",
    "pretrain_base_lvlm",
    "select_eval_items",
    "training_batches",
    "validation_metrics",
]

#: Bump when the recipe (architecture, data, loop) changes so ensure_base_lvlm rebuilds.
BASE_LVLM_VERSION = 1
TRAINING_FILE = "training.json"

#: Words of the prompt template that are not SynthMed words ("USER:", "ASSISTANT:").
CHAT_WORDS = ("user", "assistant")

#: tiny_student keyword arguments of the base LVLM (64 px / 8 px patches -> 8x8 grid).
DEFAULT_ARCHITECTURE: dict[str, int] = {
    "image_size": 64,
    "patch_size": 8,
    "hidden_size": 64,
    "num_layers": 4,
    "num_heads": 4,
    "num_kv_heads": 2,
    "vision_hidden_size": 64,
    "vision_layers": 3,
}

#: Training defaults of :func:`pretrain_base_lvlm`.
DEFAULT_TRAINING: dict[str, Any] = {
    "steps": 400,
    "batch_size": 32,
    "lr": 4e-3,
    "warmup_steps": 20,
    "weight_decay": 0.01,
    "max_length": 160,
    "val_questions": 300,
}


def base_lvlm_words() -> list[str]:
    """The tokenizer vocabulary: SynthMed's words plus the prompt's chat words."""
    return list(SYNTHMED_WORDS) + [w for w in CHAT_WORDS if w not in SYNTHMED_WORDS]


# ------------------------------------------------------------------------------ helpers


@contextmanager
def _torch_threads(num_threads: int | None):
    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class _ImageCache:
    """Decoded RGB images by path, each file read once."""

    def __init__(self):
        self._images: dict[Path, Image.Image] = {}

    def __call__(self, path: Path) -> Image.Image:
        image = self._images.get(path)
        if image is None:
            with Image.open(path) as im:
                image = im.convert("RGB")
            self._images[path] = image
        return image


def _as_item(item, images: _ImageCache) -> dict[str, Any]:
    """A collator item from a ``ConversationItem`` (no mask: training and VQA scoring need none)."""
    return {
        "id": item.id,
        "turn": item.turn,
        "image_id": item.image_id,
        "image": images(item.image_path),
        "question": item.question,
        "answer": item.answer,
        "answer_type": item.answer_type,
        "question_type": item.question_type,
    }


def select_eval_items(dataset, num: int, answer_types=("closed", "open")) -> list:
    """``num`` evenly spaced ``ConversationItem``s of ``answer_types`` (deterministic, seed-free)."""
    pool = [item for item in dataset.items if item.answer_type in answer_types]
    if num >= len(pool):
        return pool
    index = np.linspace(0, len(pool) - 1, num).round().astype(int)
    return [pool[i] for i in index]


def validation_metrics(model, processor, items, *, batch_size: int = 32, max_new_tokens: int = 12) -> dict[str, Any]:
    """The run's evaluation (:func:`~medalign_platform.run.evaluation.evaluate_items`, no
    tap) of greedy answers to ``items`` (collator items), plus three SynthMed diagnostics.

    Adds ``closed_yes_no_rate`` (share of closed answers whose normalised text is exactly
    ``yes`` or ``no``), ``text_only_prior`` (the accuracy of always giving the majority
    closed answer of these items) and ``examples`` (the first 12 questions with reference
    and prediction). Per question type closed accuracy is ``by_qtype/<type>/closed_accuracy``.
    """
    from ..data.metrics import normalize_answer
    from ..run.evaluation import evaluate_items

    kept: list[list[str]] = []
    metrics: dict[str, Any] = evaluate_items(model, processor, None, items, batch_size=batch_size,
                                             max_new_tokens=max_new_tokens,
                                             on_predictions=lambda _items, predictions, _: kept.append(predictions))
    predictions = kept[0]
    closed = [(p, it) for p, it in zip(predictions, items) if it["answer_type"] == "closed"]
    if closed:
        metrics["closed_yes_no_rate"] = sum(normalize_answer(p) in ("yes", "no") for p, _ in closed) / len(closed)
        yes = sum(normalize_answer(it["answer"]) == "yes" for _, it in closed) / len(closed)
        metrics["text_only_prior"] = max(yes, 1 - yes)
    metrics["examples"] = [
        {"question": it["question"], "reference": it["answer"], "prediction": p}
        for p, it in list(zip(predictions, items))[:12]
    ]
    return metrics


def init_small_width(model, seed: int, position_std: float = 1.0) -> None:
    """Re-initialises a tiny LLaVA for fast learning at small width (in place, deterministic).

    HF's ``initializer_range=0.02`` suits widths of a few thousand (``0.02 ~ 1/sqrt(2500)``).
    At width 64 it shrinks every linear map's output ~6x, so the little the image changes
    reaches the answer position attenuated by orders of magnitude and a from-scratch model
    learns only the text prior for hundreds of steps. Here:

    * every linear layer of the LLM and the projector (LM head included) gets fan-in
      (LeCun) init ``N(0, 1/fan_in)``; the residual-branch outputs (``o_proj``,
      ``down_proj``) are further scaled by ``1/sqrt(2 * num_layers)`` (GPT-2 style);
    * the token embeddings get ``N(0, 1)``, the scale of the projected image tokens;
    * the CLIP vision tower's position embeddings get ``N(0, position_std^2)``: with CLIP's
      0.02 they are ~15x smaller than a patch embedding, so the pre-LayerNorm divides the
      local contrast (the lesion cue) away and the image tokens carry almost no position.

    The vision tower's other weights keep CLIP's init (already fan-in scaled).
    """
    from torch import nn

    from ..core.student import base_model, language_model

    root = base_model(model)
    generator = torch.Generator().manual_seed(seed)
    num_layers = len(language_model(root).layers)
    with torch.no_grad():
        for name, module in root.named_modules():
            if "vision_tower" in name:
                continue
            if isinstance(module, nn.Linear):
                std = module.in_features ** -0.5
                if name.endswith(("o_proj", "down_proj")):
                    std /= (2 * num_layers) ** 0.5
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator))
                if module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()
        positions = [m.position_embedding for n, m in root.named_modules()
                     if "vision_tower" in n and isinstance(getattr(m, "position_embedding", None), nn.Embedding)]
        if len(positions) != 1:
            raise TypeError("expected one CLIP-style vision embedding with position_embedding in the vision tower")
        weight = positions[0].weight
        weight.copy_(torch.randn(weight.shape, generator=generator) * position_std)


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample mean next-token loss over the answer, averaged over samples.

    Every question weighs the same, so one-token closed answers are not drowned out by the
    ~30-token reports as they are under the usual token-mean loss.
    """
    from ..core.student import IGNORE_INDEX

    logits, targets = logits[:, :-1].float(), labels[:, 1:]
    token = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(targets.shape)
    valid = (targets != IGNORE_INDEX).to(token.dtype)
    return ((token * valid).sum(1) / valid.sum(1).clamp(min=1)).mean()


def training_batches(items, steps: int, batch_size: int, seed: int, group: int = 8) -> list[list[int]]:
    """``steps`` batches of item indices: shuffled epochs, reports batched together.

    Not the run loop's :func:`~medalign_platform.run.optimization.epoch_batches`, whose
    batches follow one epoch's permutation in order (resumable from ``(seed, epoch)``):
    the grouping below reorders items inside each run of ``group`` batches, which the
    pre-training's mix of one-word answers and ~30-token reports needs for speed, and this
    builder never resumes. The order is part of the prepared weights.

    Length grouping (as in HF's ``group_by_length``): each run of ``group`` batches is
    drawn from the shuffled order, sorted so the ~30-token reports share batches instead of
    padding short VQA samples to their length (~7% faster), and the batches of the run are
    shuffled again. Deterministic given ``seed``.
    """
    rng = np.random.default_rng(seed)
    n = len(items)
    if n == 0:
        raise ValueError("no training items")
    epochs = max(1, math.ceil(steps * batch_size / n))
    order = np.concatenate([rng.permutation(n) for _ in range(epochs)])[: steps * batch_size]
    is_report = np.array([item.answer_type == "report" for item in items])
    batches: list[list[int]] = []
    mega = batch_size * group
    for lo in range(0, len(order), mega):
        run = order[lo:lo + mega]
        run = run[np.argsort(is_report[run], kind="stable")]
        chunks = [run[i:i + batch_size] for i in range(0, len(run), batch_size)]
        batches.extend(chunks[j].tolist() for j in rng.permutation(len(chunks)))
    return batches


def _prepare_out_dir(out_dir: Path) -> Path:
    if out_dir.exists() and not replaceable(out_dir, TRAINING_FILE, "base_lvlm"):
        raise FileExistsError(
            f"base LVLM: {out_dir} exists and is not a base-LVLM build (no {TRAINING_FILE} written by "
            "pretrain_base_lvlm); choose an empty or new directory"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"


# ------------------------------------------------------------------------------ training


def pretrain_base_lvlm(
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    steps: int = DEFAULT_TRAINING["steps"],
    batch_size: int = DEFAULT_TRAINING["batch_size"],
    lr: float = DEFAULT_TRAINING["lr"],
    warmup_steps: int = DEFAULT_TRAINING["warmup_steps"],
    weight_decay: float = DEFAULT_TRAINING["weight_decay"],
    max_length: int = DEFAULT_TRAINING["max_length"],
    val_questions: int = DEFAULT_TRAINING["val_questions"],
    architecture: dict[str, int] | None = None,
    num_threads: int | None = 1,
    progress: bool = True,
) -> Path:
    """Builds and briefly pre-trains the tiny base LVLM on SynthMed; returns ``Path(out_dir)``.

    Args:
        data_dir: a SynthMed directory (``train.json``, ``val.json``, images; see
            :func:`medalign_platform.synthmed.generator.ensure_synthmed`). Any LLaVA conversation
            dataset with those two files and only SynthMed words works too.
        out_dir: where the model, processor and ``training.json`` go. Built in a temporary
            sibling and moved into place when complete; an existing ``out_dir`` is replaced
            only if it is empty or a previous build.
        seed: weights and the data order are a function of it.
        steps, batch_size, lr, warmup_steps, weight_decay: AdamW full fine-tune of all
            parameters, linear warmup then cosine decay to ``lr / 10``, gradient norm
            clipped at 1.
        max_length: most tokens per sample (64 image tokens included); answers are cut to it.
        val_questions: closed + open val questions scored at the end (0 skips evaluation).
        architecture: overrides of :data:`DEFAULT_ARCHITECTURE` (tiny_student arguments).
        num_threads: torch CPU threads during the build (restored afterwards); ``None``
            leaves the current setting.
        progress: show a progress bar.
    """
    from ..data.conversations import load_conversation_dataset
    from ..core.student import load_student
    from .tiny_student import tiny_student

    start = time.perf_counter()
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    if steps < 0 or batch_size < 1:
        raise ValueError(f"need steps >= 0 and batch_size >= 1, got steps={steps}, batch_size={batch_size}")
    arch = {**DEFAULT_ARCHITECTURE, **(architecture or {})}
    unknown = set(arch) - set(DEFAULT_ARCHITECTURE)
    if unknown:
        raise ValueError(f"unknown architecture keys {sorted(unknown)}; choose from {sorted(DEFAULT_ARCHITECTURE)}")
    for split in ("train", "val"):
        if not (data_dir / f"{split}.json").is_file():
            raise FileNotFoundError(f"base LVLM: {data_dir / f'{split}.json'} not found; generate SynthMed first "
                                    "(medalign_platform.synthmed.generator.ensure_synthmed(data_dir))")
    tmp = _prepare_out_dir(out_dir)
    try:
        with _torch_threads(num_threads):
            # Images were checked when SynthMed was generated; file existence is still checked.
            train = load_conversation_dataset(data_dir / "train.json", validate_images=False)
            val = load_conversation_dataset(data_dir / "val.json", validate_images=False)
            tiny_student(tmp, words=base_lvlm_words(), seed=seed, **arch)
            model, processor = load_student(tmp)
            init_small_width(model, seed)
            collator = StudentCollator(processor, max_length=max_length, padding_side="right")
            images = _ImageCache()

            torch.manual_seed(seed)
            batches = training_batches(train.items, steps, batch_size, seed)
            num_items = len(train.items)
            decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
            no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
            optimizer = torch.optim.AdamW(
                [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                lr=lr, betas=(0.9, 0.98), eps=1e-8,
            )
            setup_seconds = time.perf_counter() - start
            model.train()
            losses: list[float] = []
            bar = tqdm(range(steps), desc="base LVLM", unit="step", disable=not progress)
            for step in bar:
                batch, _ = collator([_as_item(train.items[i], images) for i in batches[step]])
                for group in optimizer.param_groups:
                    group["lr"] = warmup_cosine_lr(step, steps, lr, warmup_steps, floor=0.1)
                labels = batch.pop("labels")
                loss = answer_loss(model(**batch).logits, labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                losses.append(float(loss.detach()))
                if step % 10 == 0 or step == steps - 1:
                    bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
            bar.close()
            train_seconds = time.perf_counter() - start - setup_seconds
            model.eval()
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)

            metrics: dict[str, Any] = {}
            eval_seconds = 0.0
            if val_questions > 0:
                eval_start = time.perf_counter()
                eval_items = [_as_item(item, images) for item in select_eval_items(val, val_questions)]
                metrics = validation_metrics(model, processor, eval_items)
                eval_seconds = time.perf_counter() - eval_start

        manifest = load_manifest(data_dir)
        tail = losses[-max(1, min(20, len(losses))):] if losses else []
        info = {
            "name": "base_lvlm",
            "version": BASE_LVLM_VERSION,
            "seed": seed,
            "data": {
                "dir": str(data_dir.resolve()),
                "synthmed_version": manifest.get("version") if manifest else None,
                "tree_sha256": manifest.get("tree_sha256") if manifest else None,
                "train_items": num_items,
            },
            "architecture": arch,
            "training": {
                "steps": steps, "batch_size": batch_size, "lr": lr, "warmup_steps": warmup_steps,
                "weight_decay": weight_decay, "max_length": max_length, "schedule": "linear warmup, cosine to lr/10",
                "loss": "per-sample mean over answer tokens (answer_loss)",
                "batching": "shuffled epochs, reports grouped (training_batches)",
                "optimizer": "AdamW(betas=(0.9, 0.98)), grad-norm clip 1.0",
                "trainable": "all parameters (vision tower, projector, LLM)",
                "prompt_template": PROMPT_TEMPLATE, "num_threads": num_threads,
                "samples_seen": steps * batch_size,
            },
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "final_loss": float(np.mean(tail)) if tail else None,
            "loss_curve": {str(s): round(float(np.mean(losses[max(0, s - 9):s + 1])), 4)
                           for s in range(9, len(losses), max(10, len(losses) // 20))},
            "val": {"questions": val_questions, **metrics},
            "seconds": {"setup": round(setup_seconds, 2), "train": round(train_seconds, 2),
                        "eval": round(eval_seconds, 2),
                        "total": round(time.perf_counter() - start, 2)},
            "versions": {"torch": torch.__version__},
        }
        (tmp / TRAINING_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def ensure_base_lvlm(data_dir: str | os.PathLike, out_dir: str | os.PathLike, **kwargs) -> Path:
    """Reuses ``out_dir`` if it holds a build of this version with the same seed, settings and
    data (SynthMed ``tree_sha256``), else runs :func:`pretrain_base_lvlm` with ``kwargs``."""
    out_dir = Path(out_dir)
    try:
        info = json.loads((out_dir / TRAINING_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        info = None
    manifest = load_manifest(data_dir)
    if info is not None and manifest is not None and info.get("version") == BASE_LVLM_VERSION:
        wanted_training = {k: kwargs.get(k, DEFAULT_TRAINING[k]) for k in
                           ("steps", "batch_size", "lr", "warmup_steps", "weight_decay", "max_length")}
        same = (
            info.get("seed") == kwargs.get("seed", 0)
            and info.get("architecture") == {**DEFAULT_ARCHITECTURE, **(kwargs.get("architecture") or {})}
            and all(info.get("training", {}).get(k) == v for k, v in wanted_training.items())
            and info.get("data", {}).get("tree_sha256") == manifest.get("tree_sha256")
            and (out_dir / "config.json").is_file()
        )
        if same:
            return out_dir
    return pretrain_base_lvlm(data_dir, out_dir, **kwargs)
