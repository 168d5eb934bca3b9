"""SynthMed baselines: base model vs LoRA-only vs MedAlign, 3 seeds, on the test split.

Regenerates the table and example grid in docs/synthmed.md:

    .venv/bin/python benchmarks/synthmed_baselines.py            # ~10 min on 2 CPU cores

Runs `medalign prepare data=synthmed` first if needed (cached). Each fine-tuning run is
the same training loop that Ray Train workers execute (`training.run_training`), here in
one local process so that the figures do not include cluster start-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import textwrap
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

METRICS = [("test/closed_accuracy", "closed accuracy"), ("test/open_recall", "open recall"),
           ("test/grounding", "grounding score")]
VARIANTS = {
    "LoRA only": ["distill=lora_only"],
    "MedAlign (default weights)": [],
}


def evaluate_base(config: dict) -> dict:
    """Test metrics of the pre-trained base LVLM, no fine-tuning."""
    from medalign_platform.core.student import load_student
    from medalign_platform.core.tap import DistillationTap
    from medalign_platform.data.splits import evaluation_items, load_split
    from medalign_platform.run.evaluation import evaluate_items
    from medalign_platform.run.settings import RunSettings

    model, processor = load_student(config["model"]["path"])
    tap = DistillationTap(model, config["distill"]["layer"], capture_attention=True)
    items = evaluation_items(load_split(RunSettings.from_config(config).data, "test"), config["trainer"]["test_size"])
    metrics = evaluate_items(model, processor, tap, items, batch_size=config["trainer"]["eval_batch_size"],
                             max_new_tokens=config["trainer"]["max_new_tokens"])
    return {f"test/{k}": v for k, v in metrics.items()}


def train_variant(overrides: list[str], seed: int) -> dict:
    from medalign_platform.run.compose import compose_config
    from medalign_platform.run.loop import RunContext, run_training
    from medalign_platform.run.settings import RunSettings

    config = compose_config(["experiment=synthmed_vqa", f"trainer.seed={seed}", "trainer.eval_every=0", *overrides])
    RunSettings.from_config(config).check_paths()
    with tempfile.TemporaryDirectory() as scratch:
        return run_training(config, RunContext(report=lambda metrics, checkpoint: None, scratch_dir=Path(scratch)))


def example_grid(data_dir: Path, out: Path, count: int = 8) -> None:
    """A PNG grid of test images with their lesion masks outlined and a few Q/A pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image

    from medalign_platform.data.conversations import read_mask

    records = json.loads((data_dir / "test.json").read_text())
    by_image: dict[str, list[dict]] = {}
    for record in records:
        by_image.setdefault(record["image_id"], []).append(record)
    # A mix of 0, 1 and 2 lesions, so the grid shows every kind of answer.
    lesions = {image_id: len(np.unique(np.asarray(Image.open(data_dir / items[0]["mask"])))) - 1
               for image_id, items in list(by_image.items())[:60]}
    chosen: list[str] = []
    for wanted in (0, 1, 1, 1, 2, 2, 2, 0):
        chosen.append(next(i for i in lesions if lesions[i] == wanted and i not in chosen))
    fig, axes = plt.subplots(2, count // 2, figsize=(4 * count // 2, 11))
    for axis, image_id in zip(axes.flat, chosen):
        items = by_image[image_id]
        image = np.asarray(Image.open(data_dir / items[0]["image"]).convert("RGB"))
        mask = read_mask(data_dir / items[0]["mask"])
        axis.imshow(image)
        if mask.any():
            axis.contour(mask, levels=[0.5], colors="red", linewidths=1.0)
        lines = []
        for record in items:
            if record["answer_type"] in ("closed", "open") and len(lines) < 4:
                question = record["conversations"][0]["value"].replace("<image>\n", "")
                lines.append(f"Q: {question}  A: {record['conversations'][1]['value']}")
        report = next((r["conversations"][1]["value"] for r in items if r["answer_type"] == "report"), "")
        lines += textwrap.wrap(f"Report: {report}", 60)
        axis.text(0.0, -0.03, "\n".join(lines), transform=axis.transAxes, va="top", fontsize=7, family="monospace")
        axis.set_title(image_id, fontsize=8)
        axis.axis("off")
    fig.subplots_adjust(left=0.02, right=0.98, top=0.97, bottom=0.12, hspace=0.55, wspace=0.1)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "synthmed_results.json")
    parser.add_argument("--grid", type=Path, default=ROOT / "docs" / "synthmed_examples.png")
    args = parser.parse_args(argv)

    from medalign_platform.run.compose import compose_config
    from medalign_platform.synthmed.prepare import SynthMedPrepareSettings, prepare_synthmed

    prepared = prepare_synthmed(SynthMedPrepareSettings())
    example_grid(prepared.data_dir, args.grid)
    base_config = compose_config(["experiment=synthmed_vqa"])
    started = time.perf_counter()
    results: dict[str, list[dict]] = {"Base model (no fine-tuning)": [evaluate_base(base_config)]}
    for name, overrides in VARIANTS.items():
        results[name] = []
        for seed in args.seeds:
            metrics = train_variant(overrides, seed)
            results[name].append({k: v for k, v in metrics.items() if k.startswith("test/")})
            print(f"{name} seed {seed}: " + ", ".join(f"{label} {metrics.get(key, float('nan')):.3f}"
                                                     for key, label in METRICS), flush=True)
    rows = ["| variant | runs | " + " | ".join(label for _, label in METRICS) + " |",
            "| --- | --- | " + " | ".join("---" for _ in METRICS) + " |"]
    for name, runs in results.items():
        cells = []
        for key, _ in METRICS:
            values = [run[key] for run in runs if key in run]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.3f} ± {spread:.3f}" if values else "n/a")
        rows.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    table = "\n".join(rows)
    args.out.write_text(json.dumps({"results": results, "table": table, "seconds": time.perf_counter() - started,
                                    "teacher": prepared.teacher_metrics, "student": prepared.student_metrics},
                                   indent=2))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
