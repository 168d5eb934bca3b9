"""Linear probes: can the student *see* what SynthMed asks?

A fine-tune of the LLM (LoRA, as in MedAlign) cannot add what the visual tokens lack, so
the benchmark first checks that the tokens the LLM receives (the projector's output, one
``D``-vector per patch) carry the answers. Each probe is a linear classifier
(multinomial logistic regression with an L2 penalty, :func:`fit_probe`), fitted on train
images and scored on held-out images:

* ``quadrant``: for every (image, quadrant), is there a lesion? One binary probe per
  quadrant on all visual tokens (flattened); accuracy over all (image, quadrant) pairs.
* ``count``: number of lesions (0-3), from all visual tokens.
* ``size``, ``contrast`` (the attributes questions ask): for every lesion, its value from
  the tokens of its quadrant only (the place a question names): what a reader that looks
  at the right place can get.

Deterministic given the inputs (full-batch L-BFGS from zero weights, float64). Until
version 3's build the probes were ridge regressions on one-hot targets: on that build they
read the count at 0.724 where logistic regression reads 0.862 (docs/synthmed.md), since a
least-squares fit to one-hot targets is a poor classifier for an ordinal quantity.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .questions import ATTRIBUTES, QUADRANTS
from .vision_pretrain import load_image_tensor

__all__ = ["PROBES", "PROBE_L2", "PROBE_METHOD", "fit_probe", "probe_student", "visual_tokens"]

PROBES = ("quadrant", "count", *ATTRIBUTES)
#: The probes' weight penalty: of 1e-4 .. 1e-1, the best count probe on the version 3
#: build's val images (docs/synthmed.md); the figures are read on the test images.
PROBE_L2 = 1e-2
PROBE_METHOD = "logistic"


@torch.no_grad()
def visual_tokens(model, processor, paths, batch_size: int = 256) -> torch.Tensor:
    """The visual tokens the LLM receives: ``[N, H*W, D]`` float32 projector outputs."""
    pixels = load_image_tensor(paths, processor)
    out = []
    for start in range(0, len(pixels), batch_size):
        features = model.model.get_image_features(pixel_values=pixels[start:start + batch_size])
        pooled = features.pooler_output if hasattr(features, "pooler_output") else features
        out.append(torch.stack(list(pooled)) if isinstance(pooled, (list, tuple)) else pooled)
    return torch.cat(out).float()


def fit_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
              *, l2: float = PROBE_L2, max_iter: int = 100) -> float:
    """Test accuracy of a linear probe: multinomial logistic regression with an L2 penalty.

    Features are standardised on the training set; the weights (``[F, C]`` plus a bias)
    minimise the mean cross-entropy plus ``l2 * ||W||^2`` by full-batch L-BFGS from zero,
    in float64: seconds on a 2-core CPU for the probes' ~4k features and 2000 images.

    Args:
        train_x, test_x: ``[n, F]`` features.
        train_y, test_y: ``[n]`` int64 classes.
        l2: the weight penalty (:data:`PROBE_L2`).
        max_iter: L-BFGS iterations (on version 3's build the count probe reads 0.846 /
            0.862 / 0.862 / 0.864 after 50 / 100 / 200 / 300, for 12 / 20 / 40 / 65 s of CPU).
    """
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    x = ((train_x - mean) / std).double()
    z = ((test_x - mean) / std).double()
    classes = int(max(train_y.max(), test_y.max())) + 1
    weight = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

    def loss():
        optimizer.zero_grad()
        value = torch.nn.functional.cross_entropy(x @ weight + bias, train_y) + l2 * weight.square().sum()
        value.backward()
        return value

    with torch.enable_grad():   # probe_student runs under no_grad (the student's forward)
        optimizer.step(loss)
    with torch.no_grad():
        predicted = (z @ weight + bias).argmax(1)
    return float((predicted == test_y).double().mean())


def _quadrant_cells(grid: int) -> dict[str, list[int]]:
    half = grid // 2
    cells: dict[str, list[int]] = {}
    for quadrant in QUADRANTS:
        rows = range(half) if quadrant.endswith("upper") else range(half, grid)
        cols = range(half) if quadrant.startswith("left") else range(half, grid)
        cells[quadrant] = [r * grid + c for r in rows for c in cols]
    return cells


def _probe_sets(tokens: torch.Tensor, annotations: list[dict], grid: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    flat = tokens.flatten(1)
    cells = _quadrant_cells(grid)
    sets = {f"quadrant:{quadrant}": (flat, torch.tensor([any(l["quadrant"] == quadrant for l in a["lesions"])
                                                         for a in annotations]).long())
            for quadrant in QUADRANTS}
    sets["count"] = (flat, torch.tensor([len(a["lesions"]) for a in annotations]))
    for attribute, values in ATTRIBUTES.items():
        xs, ys = [], []
        for i, annotation in enumerate(annotations):
            for lesion in annotation["lesions"]:
                xs.append(tokens[i, cells[lesion["quadrant"]]].flatten())
                ys.append(values.index(lesion[attribute]))
        sets[attribute] = (torch.stack(xs), torch.tensor(ys))
    return sets


def probe_student(model, processor, data_dir: str | Path, *, train_images: int = 2000, test_split: str = "test",
                  test_images: int = 500, l2: float = PROBE_L2) -> dict[str, float]:
    """Fits every probe in :data:`PROBES` on ``train_images`` train images and scores it
    on the first ``test_images`` images of ``test_split``.

    Returns:
        ``{probe: held-out accuracy}`` plus ``train_images``, ``test_images`` and ``method``
        (:data:`PROBE_METHOD`; builds made before it have no ``method``: ridge probes).
    """
    data_dir = Path(data_dir)
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    split_sets = {}
    for split, limit in (("train", train_images), (test_split, test_images)):
        annotations = json.loads((data_dir / "annotations" / f"{split}.json").read_text(encoding="utf-8"))[:limit]
        tokens = visual_tokens(model, processor, [data_dir / a["image"] for a in annotations])
        split_sets[split] = _probe_sets(tokens, annotations, grid)
        split_sets[split]["_n"] = len(annotations)
    train, test = split_sets["train"], split_sets[test_split]
    result: dict[str, float] = {}
    for name in PROBES:
        if name == "quadrant":   # one binary probe per quadrant, accuracy over all (image, quadrant)
            scores = [fit_probe(*train[f"quadrant:{q}"], *test[f"quadrant:{q}"], l2=l2) for q in QUADRANTS]
            result[name] = round(float(np.mean(scores)), 4)
        else:
            result[name] = round(fit_probe(*train[name], *test[name], l2=l2), 4)
    result["train_images"], result["test_images"] = train["_n"], test["_n"]
    result["method"] = PROBE_METHOD
    return result
