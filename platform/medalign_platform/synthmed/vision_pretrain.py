"""Dense pre-training of the tiny student's vision tower: every visual token learns what is under it.

A real LVLM's CLIP tower has seen hundreds of millions of images before the LLM is attached;
the tiny SynthMed student's tower has seen nothing. Version 1 trained it only through the
LLM's answer loss for 400 steps, and linear probes on its visual tokens read the lesion
quadrant at 0.69-0.87 and the lesion count at 0.55: no fine-tune of the LLM could answer
better than its eyes. Here the tower (``model.model.vision_tower`` of a LLaVA) is first
trained on its own, as a dense per-patch classifier over the train images' label masks,
read at the layer LLaVA feeds to the projector (``vision_feature_layer``, the second to
last):

* per patch: the shape, size and contrast of the lesion covering most of the patch
  (class 0: no lesion covers at least ``min_pixels`` of it);
* per patch: whether a lesion's centroid lies in it (so that counting is linear in the
  tokens).

The heads are thrown away; the tower keeps a token per patch that says what lies there,
which is where the oracle teacher points. Deterministic given ``seed`` and the number of
torch threads.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..run.optimization import batch_stream, warmup_cosine_lr
from .questions import CONTRASTS, SIZES

__all__ = ["DEFAULT_VISION_TRAINING", "load_image_tensor", "patch_targets", "pretrain_vision_tower"]

DEFAULT_VISION_TRAINING = {"steps": 500, "batch_size": 32, "lr": 5e-3, "min_pixels": 4}

#: Classes per head: per lesion (read from its area-weighted token average) the attribute
#: values; per patch whether a lesion covers it and whether a lesion's centroid lies in it.
LESION_HEADS = {"size": len(SIZES), "contrast": len(CONTRASTS)}
PATCH_HEADS = {"covered": 2, "centre": 2}
#: Per covered patch, the attributes of the lesion covering most of it (-1 elsewhere): every
#: token of a lesion says what the lesion is, whatever the weights a reader gives them.
PATCH_ATTRIBUTE_HEADS = {f"patch_{name}": classes for name, classes in LESION_HEADS.items()}
HEADS = {**LESION_HEADS, **PATCH_HEADS, **PATCH_ATTRIBUTE_HEADS}
MAX_LESIONS = 3


def load_image_tensor(paths, processor) -> torch.Tensor:
    """Images through the student's image processor: ``[N, 3, S, S]`` float32."""
    images = []
    for path in paths:
        with Image.open(path) as im:
            images.append(im.convert("RGB"))
    out = []
    for start in range(0, len(images), 512):
        out.append(processor.image_processor(images[start:start + 512], return_tensors="pt")["pixel_values"])
    return torch.cat(out)


def cell_shares(labels: np.ndarray, grid: int, max_lesions: int = MAX_LESIONS) -> np.ndarray:
    """``[max_lesions, grid*grid]`` float32: each grid cell's share of lesion ``k+1``'s area
    (rows of absent lesions are 0). This is the oracle teacher's attention map."""
    size = labels.shape[0]
    patch = size // grid
    blocks = labels.reshape(grid, patch, grid, patch).transpose(0, 2, 1, 3).reshape(grid * grid, patch * patch)
    shares = np.zeros((max_lesions, grid * grid), np.float32)
    for k in range(1, max_lesions + 1):
        counts = (blocks == k).sum(axis=1)
        if counts.sum():
            shares[k - 1] = counts / counts.sum()
    return shares


def patch_targets(labels: np.ndarray, lesions: list[dict], grid: int, min_pixels: int) -> dict[str, np.ndarray]:
    """Dense targets of one image.

    Args:
        labels: ``[S, S]`` uint8 label mask (0 background, i = lesion i).
        lesions: the image's annotation records (``label``, ``shape``, ``size``,
            ``contrast``, ``centroid`` ``[x, y]`` in pixels).
        grid: patches per side.
        min_pixels: least lesion pixels in a patch for it to count as covered.

    Returns:
        ``covered``, ``centre``: int64 ``[grid*grid]``; ``shares``: float32
        ``[MAX_LESIONS, grid*grid]`` (:func:`cell_shares`); ``shape``, ``size``,
        ``contrast``: int64 ``[MAX_LESIONS]`` value index per lesion, -1 where absent.
    """
    size = labels.shape[0]
    patch = size // grid
    blocks = labels.reshape(grid, patch, grid, patch).transpose(0, 2, 1, 3).reshape(grid * grid, patch * patch)
    out = {"covered": ((blocks > 0).sum(axis=1) >= min_pixels).astype(np.int64),
           "centre": np.zeros(grid * grid, np.int64), "shares": cell_shares(labels, grid)}
    counts = np.stack([(blocks == k).sum(axis=1) for k in range(1, MAX_LESIONS + 1)], axis=1)  # [cells, K]
    dominant = np.where(counts.max(axis=1) >= min_pixels, counts.argmax(axis=1), -1)        # lesion index
    for name, values in (("size", SIZES), ("contrast", CONTRASTS)):
        out[name] = np.full(MAX_LESIONS, -1, np.int64)
        for lesion in lesions:
            out[name][lesion["label"] - 1] = values.index(lesion[name])
        out[f"patch_{name}"] = np.where(dominant >= 0, out[name][np.maximum(dominant, 0)], -1)
    for lesion in lesions:
        x, y = lesion["centroid"]
        out["centre"][min(int(y // patch), grid - 1) * grid + min(int(x // patch), grid - 1)] = 1
    return out


def _split_targets(data_dir: Path, split: str, grid: int, min_pixels: int) -> tuple[list[Path], dict[str, torch.Tensor]]:
    annotations = json.loads((data_dir / "annotations" / f"{split}.json").read_text(encoding="utf-8"))
    paths, targets = [], {}
    for ann in annotations:
        with Image.open(data_dir / ann["mask"]) as im:
            labels = np.asarray(im)
        for name, value in patch_targets(labels, ann["lesions"], grid, min_pixels).items():
            targets.setdefault(name, []).append(value)
        paths.append(data_dir / ann["image"])
    return paths, {name: torch.from_numpy(np.stack(values)) for name, values in targets.items()}


def dense_losses(heads: nn.ModuleDict, tokens: torch.Tensor, targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cross-entropy of every head: patch heads on each token, lesion heads on each lesion's
    area-weighted token average ``shares @ tokens``."""
    pooled = targets["shares"] @ tokens  # [B, K, D]
    out = {name: F.cross_entropy(heads[name](tokens).flatten(0, 1), targets[name].flatten()) for name in PATCH_HEADS}
    for name in LESION_HEADS:
        out[name] = F.cross_entropy(heads[name](pooled).flatten(0, 1), targets[name].flatten(), ignore_index=-1)
    for name in PATCH_ATTRIBUTE_HEADS:
        out[name] = F.cross_entropy(heads[name](tokens).flatten(0, 1), targets[name].flatten(), ignore_index=-1)
    return out


def _flip(pixels: torch.Tensor, targets: dict[str, torch.Tensor], grid: int, flags: torch.Tensor):
    """Mirrors images and their grid targets left-right (``flags[0]``) and up-down
    (``flags[1]``), per sample: attributes do not change, places do, consistently."""
    pixels = pixels.clone()
    targets = dict(targets)
    for flag, dim in ((flags[0], -1), (flags[1], -2)):
        if not flag.any():
            continue
        pixels[flag] = pixels[flag].flip(dim)
        for name in ("covered", "centre", "shares", *PATCH_ATTRIBUTE_HEADS):
            value = targets[name].clone()
            cells = value[flag].reshape(*value[flag].shape[:-1], grid, grid).flip(dim)
            value[flag] = cells.flatten(-2)
            targets[name] = value
    return pixels, targets


def _features(tower, pixel_values: torch.Tensor, feature_layer: int) -> torch.Tensor:
    """``[B, N, D]`` patch tokens at the layer LLaVA reads (CLS dropped).

    Equal to ``tower(pixel_values, output_hidden_states=True).hidden_states[feature_layer]``
    without running the blocks above that layer (a third of the tower at the default -2).
    """
    layers = tower.encoder.layers
    used = feature_layer if feature_layer >= 0 else len(layers) + 1 + feature_layer
    hidden = tower.pre_layrnorm(tower.embeddings(pixel_values))
    for block in layers[:used]:
        hidden = block(hidden, None)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    return hidden[:, 1:]


def pretrain_vision_tower(model, processor, data_dir: str | Path, *, seed: int = 0,
                          steps: int = DEFAULT_VISION_TRAINING["steps"],
                          batch_size: int = DEFAULT_VISION_TRAINING["batch_size"],
                          lr: float = DEFAULT_VISION_TRAINING["lr"],
                          min_pixels: int = DEFAULT_VISION_TRAINING["min_pixels"],
                          eval_images: int = 500, progress: bool = False) -> dict:
    """Trains ``model``'s vision tower in place on dense patch targets; returns a record.

    Args:
        model: a ``LlavaForConditionalGeneration`` (only its vision tower changes).
        processor: its processor (image normalisation).
        data_dir: SynthMed root (``annotations/``, ``images/``, ``masks/``).
        seed: head init and batch order.
        steps, batch_size, lr: AdamW, 5% warm-up, cosine to 0.
        min_pixels: see :func:`patch_targets`.
        eval_images: val images scored at the end (per-patch accuracy of every head).

    Returns:
        JSON-able record: settings, loss, per-head val accuracy on lesion patches and on all
        patches, seconds.
    """
    from tqdm.auto import tqdm

    data_dir = Path(data_dir)
    tower = model.model.vision_tower
    config = model.config
    vision = config.vision_config
    grid = vision.image_size // vision.patch_size
    layer = config.vision_feature_layer if isinstance(config.vision_feature_layer, int) else -2
    start = time.perf_counter()
    paths, targets = _split_targets(data_dir, "train", grid, min_pixels)
    pixels = load_image_tensor(paths, processor)
    generator = torch.Generator().manual_seed(seed)
    heads = nn.ModuleDict({name: nn.Linear(vision.hidden_size, classes) for name, classes in HEADS.items()})
    with torch.no_grad():
        for head in heads.values():
            head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * head.in_features ** -0.5)
            head.bias.zero_()
    parameters = list(tower.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    tower.train()
    losses = []
    # One generator for head init, batch order and flips, drawn in that order each step.
    batches = batch_stream(len(paths), batch_size, steps, generator)
    for step, index in enumerate(tqdm(batches, total=steps, desc="vision tower", disable=not progress)):
        index = torch.tensor(index)
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine_lr(step, steps, lr, warmup)
        batch_pixels, batch_targets = _flip(pixels[index], {k: v[index] for k, v in targets.items()}, grid,
                                            torch.rand(2, len(index), generator=generator) < 0.5)
        tokens = _features(tower, batch_pixels, layer)  # [B, N, D]
        loss = sum(dense_losses(heads, tokens, batch_targets).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
    tower.eval()
    train_seconds = time.perf_counter() - start
    record = {"steps": steps, "batch_size": batch_size, "lr": lr, "min_pixels": min_pixels, "seed": seed,
              "feature_layer": layer, "heads": dict(HEADS), "initial_loss": losses[0] if losses else None,
              "final_loss": float(np.mean(losses[-20:])) if losses else None}
    if eval_images and (data_dir / "annotations" / "val.json").is_file():
        val_paths, val_targets = _split_targets(data_dir, "val", grid, min_pixels)
        val_paths = val_paths[:eval_images]
        with torch.no_grad():
            tokens = _features(tower, load_image_tensor(val_paths, processor), layer)
        n = len(val_paths)
        val_targets = {k: v[:n] for k, v in val_targets.items()}
        accuracy = {}
        for name in PATCH_HEADS:
            correct = heads[name](tokens).argmax(-1) == val_targets[name]
            accuracy[name] = float(correct[val_targets["covered"] > 0].float().mean())
        pooled = val_targets["shares"] @ tokens
        for name in LESION_HEADS:
            present = val_targets[name] >= 0
            accuracy[name] = float((heads[name](pooled).argmax(-1) == val_targets[name])[present].float().mean())
        for name in PATCH_ATTRIBUTE_HEADS:
            covered = val_targets[name] >= 0
            accuracy[name] = float((heads[name](tokens).argmax(-1) == val_targets[name])[covered].float().mean())
        record["val_accuracy"] = accuracy
    record["seconds"] = {"train": round(train_seconds, 2), "total": round(time.perf_counter() - start, 2)}
    return record
