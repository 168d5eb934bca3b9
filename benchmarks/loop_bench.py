"""Training-loop efficiency: the bare step on pre-built device batches vs the full training loop.

One process, one random-weight LLaVA-style student (the shapes of ``step_bench.py``), one
batch configuration and one dataset, measured two ways:

1. **step**: :func:`medalign_platform.run.loop.train_step` (forward, backward, gradient
   accumulation, clipping, AdamW) over micro-batches that were collated and copied to the
   device beforehand (the run's first micro-batches, cycled). Nothing else runs.
2. **loop**: :func:`medalign_platform.run.loop.train`, the loop every run uses, over the
   real input pipeline: PNG files decoded by DataLoader workers, the student's processor,
   teacher targets read from a real target cache (safetensors shards of random targets:
   no teacher model is needed), span layouts, pinned non-blocking copies; logging every
   ``--log-every`` steps (metrics, TensorBoard), the non-finite check. Timed from the end
   of warm-up step ``w`` to the end of step ``N-1``, so the final evaluation is outside.

It prints loop samples/s / step samples/s (target >= 0.95) and evaluation's share of a run
at the trainer preset's ``eval_every`` and ``val_size`` (``experiments/trainer/cpu.yaml`` on
the CPU, ``gpu.yaml`` on a GPU): per-item generation time measured on the final
evaluation, times ``val_size``, against ``eval_every`` loop steps. MFU uses the formula of
``benchmarks/flops.py``.

Example::

    PYTHONPATH=platform python benchmarks/loop_bench.py --size tiny
    PYTHONPATH=platform python benchmarks/loop_bench.py --size 7b --json loop.json        # one GPU

Imports no Hydra, Ray, open_clip or metric packages (``--size 7b`` runs on a bare GPU host).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
for path in (BENCH_DIR, ROOT / "platform"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import flops  # noqa: E402
import step_bench  # noqa: E402

TARGET_RATIO = 0.95
SPECIALS = {"<unk>": 0, "<s>": 1, "</s>": 2}
WORDS = ["user", "assistant", ":", "?", "."]


# --------------------------------------------------------------------------- processor and data


def build_processor(shape: step_bench.Shape):
    """A word-level tokenizer and CLIP image processor whose ids match the random student's config.

    ``<image>`` gets ``shape.image_token_id`` and ``<pad>`` the next id (``step_bench.build_config``);
    every other id is a filler word ``w<id>``.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    vocab = dict(SPECIALS)
    vocab["<image>"], vocab["<pad>"] = shape.image_token_id, shape.image_token_id + 1
    vocab.update({word: 3 + i for i, word in enumerate(WORDS)})
    used = set(vocab.values())
    vocab.update({f"w{i}": i for i in range(shape.vocab) if i not in used})
    core = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        pad_token="<pad>", additional_special_tokens=["<image>"])
    size = shape.image_size
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=shape.patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


def filler_range(shape: step_bench.Shape) -> tuple[int, int]:
    return 16, shape.image_token_id  # plain words, below the image/pad ids


def write_dataset(root: Path, shape: step_bench.Shape, items: int, seq_text: int, image_px: int, seed: int) -> Path:
    """``items`` LLaVA conversation records with PNG images of ``image_px`` pixels; returns the JSON path.

    Each prompt has ``seq_text`` text tokens with the processor's template: ``<s> USER :``,
    the question, ``ASSISTANT :``, the answer (a quarter of the text) and ``</s>``.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    low, high = filler_range(shape)
    answer = max(1, seq_text // 4)
    question = seq_text - 6 - answer
    if question < 1:
        raise ValueError(f"--seq-text must be >= {7 + answer}")
    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for index in range(items):
        # Smooth structure plus noise: PNG decoding costs what a real scan's does, roughly.
        coarse = rng.integers(0, 255, (image_px // 16, image_px // 16, 3), dtype=np.uint8)
        image = np.asarray(Image.fromarray(coarse).resize((image_px, image_px), Image.BILINEAR), dtype=np.int16)
        image = np.clip(image + rng.integers(-12, 12, image.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / f"{index:05d}.png")
        words = [f"w{i}" for i in rng.integers(low, high, question + answer)]
        # "closed": scored by exact match, so evaluation needs no sacrebleu/rouge (absent on the bare
        # GPU host); generation, the whole cost of an evaluation, is the same for any answer type.
        records.append({"id": f"bench-{index}", "image": f"images/{index:05d}.png", "answer_type": "closed",
                        "conversations": [{"from": "human", "value": "<image>\n" + " ".join(words[:question])},
                                          {"from": "gpt", "value": " ".join(words[question:])}]})
    path = root / "bench.json"
    path.write_text(json.dumps(records))
    return path


@dataclass
class RandomTeacher:
    """What the target cache needs of a teacher, with random targets (no teacher model)."""

    grid: tuple[int, int]
    width: int
    seed: int = 0

    @property
    def identity(self) -> str:
        return f"loop-bench-random-teacher-{self.grid[0]}x{self.grid[1]}x{self.width}-seed{self.seed}".ljust(64, "0")

    def encode_images(self, images, batch_size=None):
        from medalign_platform.core.teacher import TeacherOutputs

        generator = torch.Generator().manual_seed(self.seed + len(images))
        patches = self.grid[0] * self.grid[1]
        tokens = torch.randn(len(images), patches, self.width, generator=generator)
        attention = torch.softmax(torch.randn(len(images), patches, generator=generator), dim=-1)
        return TeacherOutputs(tokens, attention, self.grid)


def fill_target_cache(cache_dir: Path, image_paths: list[str], shape: step_bench.Shape):
    """Writes random targets for every image into a real target cache; returns its lookup key."""
    from medalign_platform.core.target_cache import TargetCache
    from medalign_platform.run.evaluation import TeacherKey

    teacher = RandomTeacher(tuple(shape.teacher_grid), shape.teacher_dim)
    TargetCache(cache_dir).get_or_compute(teacher, image_paths)
    return TeacherKey(teacher.identity, teacher.grid, teacher.width)


def trainer_preset(name: str) -> dict:
    """``experiments/trainer/<name>.yaml`` on top of the TrainerSettings defaults."""
    import yaml

    from medalign_platform.run.settings import TrainerSettings

    values = TrainerSettings().to_dict()
    values.update(yaml.safe_load((ROOT / "experiments" / "trainer" / f"{name}.yaml").read_text()) or {})
    return values


# --------------------------------------------------------------------------- measuring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(step_bench.SHAPES), default="tiny")
    parser.add_argument("--batch", type=int, default=None, help="micro-batch (default 8 for 7b, 4 for tiny)")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--seq-text", type=int, default=98, help="text tokens besides the image span")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per phase (default 10 / 8)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3 / 2)")
    parser.add_argument("--items", type=int, default=None, help="dataset size (default 96 / 48)")
    parser.add_argument("--image-px", type=int, default=None, help="PNG side (default twice the student's)")
    parser.add_argument("--preset", choices=("auto", "cpu", "gpu"), default="auto",
                        help="trainer preset for eval cadence, eval batch, decode length and data workers")
    parser.add_argument("--data-workers", type=int, default=None, help="default: the preset's")
    parser.add_argument("--log-every", type=int, default=None, help="default: the preset's (10)")
    parser.add_argument("--eval-items", type=int, default=None,
                        help="items per final evaluation of val and of test (default: one eval batch on a GPU, 16 on the CPU)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the preset's")
    parser.add_argument("--rounds", type=int, default=None,
                        help="step/loop rounds, alternating (default 1 on a GPU, 3 on the CPU); the median ratio counts")
    parser.add_argument("--lora-rank", type=int, default=64)
    parser.add_argument("--layer", type=int, default=None)
    parser.add_argument("--compile", action="store_true", help="trainer.compile (per-block torch.compile)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help=f"for MFU (default {flops.H200_BF16_DENSE_TFLOPS} on a GPU, none on the CPU)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    big = args.size == "7b"
    args.batch = args.batch or (8 if big else 4)
    args.steps = args.steps or (10 if big else 8)
    args.warmup = args.warmup if args.warmup is not None else (3 if big else 2)
    args.items = args.items or (96 if big else 48)
    if args.steps < 2 or args.batch < 1 or args.warmup < 0 or (args.rounds is not None and args.rounds < 1):
        parser.error("--steps must be >= 2, --batch >= 1, --warmup >= 0, --rounds >= 1")
    return args


def run(args: argparse.Namespace) -> dict:
    import transformers

    from medalign_platform.run.evaluation import TargetLookup, evaluate_split
    from medalign_platform.run.loop import RunContext, build_run, train, train_step
    from medalign_platform.run.settings import RunSettings, TeacherSettings

    device = step_bench.resolve_device(args.device)
    args.rounds = args.rounds or (1 if device.type == "cuda" else 3)
    preset_name = args.preset if args.preset != "auto" else ("gpu" if device.type == "cuda" else "cpu")
    preset = trainer_preset(preset_name)
    shape = step_bench.SHAPES[args.size]
    layer = args.layer if args.layer is not None else (20 if args.size == "7b" else shape.layers // 2)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = args.peak_tflops if args.peak_tflops is not None else (
        flops.H200_BF16_DENSE_TFLOPS if device.type == "cuda" else None)
    eval_batch = int(preset["eval_batch_size"])
    eval_items = args.eval_items or (eval_batch if device.type == "cuda" else min(eval_batch, 16))
    max_new = args.max_new_tokens or int(preset["max_new_tokens"])
    total_steps = args.warmup + args.steps
    scratch = Path(tempfile.mkdtemp(prefix="loop_bench-"))

    tick = time.perf_counter()
    processor = build_processor(shape)
    data = write_dataset(scratch / "data", shape, args.items, args.seq_text,
                         args.image_px or 2 * shape.image_size, args.seed)
    images = [str(scratch / "data" / record["image"]) for record in json.loads(data.read_text())]
    key = fill_target_cache(scratch / "targets", images, shape)
    teacher_settings = TeacherSettings(cache_dir=str(scratch / "targets"))
    model = step_bench.build_model(shape, device, dtype, seed=args.seed)
    prepare_s = time.perf_counter() - tick
    grid = shape.image_size // shape.patch_size
    seq_len = grid * grid + args.seq_text

    config = {
        "model": {"path": f"random-{args.size}", "dtype": "bfloat16" if dtype == torch.bfloat16 else "float32"},
        "teacher": {"cache_dir": teacher_settings.cache_dir},
        "data": {"train": str(data), "val": str(data), "test": str(data), "max_length": seq_len + 8},
        "distill": {"layer": layer, "lambda_align": 1.0, "lambda_attn": 0.06},
        "lora": {"rank": args.lora_rank, "alpha": 16.0, "dropout": 0.05},
        "optim": {"lr": 2e-4, "warmup_ratio": 0.03},
        "trainer": {"max_steps": total_steps, "batch_size": args.batch, "grad_accum": args.grad_accum,
                    "eval_every": 0, "val_size": eval_items, "test_size": eval_items, "eval_batch_size": eval_batch,
                    "max_new_tokens": max_new, "log_every": args.log_every or int(preset["log_every"]),
                    "data_workers": args.data_workers if args.data_workers is not None else int(preset["data_workers"]),
                    "prefetch_batches": int(preset["prefetch_batches"]), "compile": bool(args.compile),
                    "precision": "auto", "seed": args.seed},
        "run": {"name": "loop_bench", "output_dir": str(scratch / "runs")},
    }
    settings = RunSettings.from_config(config)
    logger = None
    try:
        from medalign_platform.run.tb_logger import RunLogger

        logger = RunLogger(scratch / "tensorboard", settings.to_dict())
    except ImportError:  # no tensorboard: the loop logs through the report callback only
        pass
    marks: dict[int, float] = {}

    def after_step(step: int) -> None:
        if step in (args.warmup, total_steps - 1):
            _sync(device)  # the window's two ends see the device finished
        marks[step] = time.perf_counter()

    evaluations: list[dict] = []

    def timed_evaluate(model_, processor_, objective, settings_, split, on_predictions=None):
        _sync(device)
        start = time.perf_counter()
        results = evaluate_split(model_, processor_, objective, settings_, split, on_predictions=on_predictions)
        _sync(device)
        evaluations.append({"split": split, "items": eval_items, "seconds": time.perf_counter() - start})
        return results

    reports: list[dict] = []
    context = RunContext(report=lambda metrics, checkpoint: reports.append(metrics), device=device,
                         scratch_dir=scratch / "checkpoints", logger=logger, after_step=after_step,
                         student=lambda _settings, _dtype: (model, processor),
                         targets=TargetLookup(teacher_settings, key=key))
    parts = build_run(settings, context)
    sample = flops.sample_flops(parts.model, seq_len)

    # The two phases alternate for --rounds rounds (step, loop, step, loop, ...), so drift in
    # a shared machine's load hits both; each round's ratio is of means over its timed steps
    # (a log step or a data stall counts), and the reported ratio is the median over rounds.
    parts.model.train()
    micro = args.grad_accum * min(total_steps, 8)
    prebuilt = [batch.to(device, parts.dtype) for batch in itertools.islice(iter(parts.micro_batches(0, micro)), micro)]
    cycle = itertools.cycle(prebuilt)
    step_times, loop_times, step_peak, loop_peak, final = [], [], None, None, {}
    try:
        for round_index in range(args.rounds):
            # 1. The bare step on pre-built device batches.
            for step in range(args.warmup):
                train_step(parts, cycle, step)
            _sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            for step in range(args.steps):
                train_step(parts, cycle, step)
            _sync(device)
            step_times.append((time.perf_counter() - start) / args.steps)
            if device.type == "cuda":
                step_peak = max(step_peak or 0.0, torch.cuda.max_memory_allocated(device) / 2**30)
                torch.cuda.reset_peak_memory_stats(device)

            # 2. The full loop over the real pipeline: the same parts, trained from step 0 again
            # (a fresh DataLoader each round); only the last round evaluates at its end.
            last = round_index == args.rounds - 1
            marks.clear()
            parts.state = {"step": 0, "evaluations": []}
            final = train(parts, timed_evaluate if last else (lambda *a, **k: {}))
            loop_times.append((marks[total_steps - 1] - marks[args.warmup]) / (total_steps - 1 - args.warmup))
            if device.type == "cuda":
                loop_peak = max(loop_peak or 0.0, torch.cuda.max_memory_allocated(device) / 2**30)
    finally:
        parts.objective.remove()
        if logger is not None:
            logger.close()
    del prebuilt, cycle
    ratios = [s_time / l_time for s_time, l_time in zip(step_times, loop_times)]
    middle = sorted(range(len(ratios)), key=ratios.__getitem__)[len(ratios) // 2]  # the (upper) median round
    ratio = ratios[middle]
    step_seconds, loop_seconds = step_times[middle], loop_times[middle]
    samples_per_step = args.batch * args.grad_accum

    def throughput(seconds: float, peak_gib) -> dict:
        rate = samples_per_step / seconds
        return {"ms_per_step": seconds * 1e3, "samples_per_s": rate, "tokens_per_s": rate * seq_len,
                "tflops": sample["total"] * rate / 1e12, "mfu": flops.mfu(sample["total"], rate, peak),
                "peak_gib": peak_gib}

    per_item = statistics.fmean(e["seconds"] / e["items"] for e in evaluations)
    eval_every, val_size = int(preset["eval_every"]), int(preset["val_size"]) or eval_items
    eval_s = per_item * val_size
    train_s = eval_every * loop_seconds
    return {
        "meta": {
            "size": args.size, "device": device.type,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "dtype": str(parts.dtype).replace("torch.", ""), "batch": args.batch, "grad_accum": args.grad_accum,
            "seq_len": seq_len, "steps": args.steps, "warmup": args.warmup, "layer": layer,
            "lora_rank": args.lora_rank, "compile": bool(args.compile), "items": args.items, "rounds": args.rounds,
            "image_px": args.image_px or 2 * shape.image_size, "log_every": settings.trainer.log_every,
            "data_workers_requested": settings.trainer.data_workers, "data_workers": parts.data_workers,
            "prepare_s": prepare_s, "setup_s": parts.setup_seconds, "peak_tflops": peak,
            "flops_per_sample": sample["total"], "flops_params": sample["params"],
        },
        "step": throughput(step_seconds, step_peak),
        "loop": {**throughput(loop_seconds, loop_peak), "data_wait_share": final.get("perf/data_wait_share")},
        "ratio_loop_over_step": ratio,
        "rounds": [{"step_ms": a * 1e3, "loop_ms": b * 1e3, "ratio": r} for a, b, r in zip(step_times, loop_times, ratios)],
        "target_ratio": TARGET_RATIO,
        "evaluation": {
            "preset": preset_name, "eval_every": eval_every, "val_size": val_size, "eval_batch_size": eval_batch,
            "max_new_tokens": max_new, "measured": evaluations, "seconds_per_item": per_item,
            "eval_s_per_evaluation": eval_s, "train_s_between_evaluations": train_s,
            "share_of_run": eval_s / (eval_s + train_s),
        },
    }


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def report(results: dict) -> str:
    meta, step, loop, ev = results["meta"], results["step"], results["loop"], results["evaluation"]
    ratio = results["ratio_loop_over_step"]
    lines = [
        f"device: {meta['device_name']} ({meta['device']}), torch {meta['torch']}, transformers {meta['transformers']}",
        f"model: --size {meta['size']}, {meta['dtype']}, layer L={meta['layer']}, LoRA r={meta['lora_rank']}, "
        f"compile={meta['compile']}; batch {meta['batch']} x accum {meta['grad_accum']}, {meta['seq_len']} tokens; "
        f"{meta['steps']} timed steps after {meta['warmup']} warm-up, {meta['rounds']} round(s) of step then loop",
        f"pipeline: {meta['data_workers']} data workers (requested {meta['data_workers_requested']}), "
        f"{meta['items']} PNGs of {meta['image_px']} px, log every {meta['log_every']} steps",
        "",
        f"{'phase':<38} {'ms/step':>9} {'samples/s':>10} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'peak GiB':>9}",
    ]
    for label, row in (("step (pre-built device batches)", step), ("loop (pipeline, logging, checks)", loop)):
        lines.append(f"{label:<38} {row['ms_per_step']:>9.1f} {row['samples_per_s']:>10.2f} "
                     f"{row['tokens_per_s']:>10,.0f} {row['tflops']:>8.3f} {_fmt(row['mfu'], '6.1%'):>6} "
                     f"{_fmt(row['peak_gib'], '9.2f'):>9}")
    lines += [
        "",
        f"loop samples/s / step samples/s: {ratio:.3f} (target >= {results['target_ratio']}; median of rounds "
        f"{', '.join(format(r['ratio'], '.3f') for r in results['rounds'])}); "
        f"the loop waited for data {_fmt(loop['data_wait_share'], '.1%')} of its time",
        f"evaluation: {ev['seconds_per_item'] * 1e3:.1f} ms/item (batch {ev['eval_batch_size']}, "
        f"{ev['max_new_tokens']} new tokens); at the {ev['preset']} preset (eval_every {ev['eval_every']}, "
        f"val_size {ev['val_size']}) evaluation is {ev['share_of_run']:.1%} of a run "
        f"({ev['eval_s_per_evaluation']:.1f} s per evaluation vs {ev['train_s_between_evaluations']:.1f} s of training)",
        f"MFU: model FLOPs per sample {meta['flops_per_sample'] / 1e12:.3f} TFLOP (benchmarks/flops.py) against "
        f"{_fmt(meta['peak_tflops'], '.1f')} TFLOP/s peak",
    ]
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    results = run(args)
    print(report(results))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
