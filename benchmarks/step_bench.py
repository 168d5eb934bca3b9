"""Plain LoRA step vs MedAlign step on the same model and batch, side by side.

Three training steps (forward + backward + AdamW over the LoRA parameters) are timed on
ONE randomly initialised LLaVA-style model in ONE process:

1. ``plain``    -- plain LoRA: SDPA attention, labels -> LM loss only, no hooks.
2. ``medalign`` -- the same model and batch through :class:`MedAlignObjective`: SDPA
   everywhere plus the layer-L forward hooks (block L's text-query attention formed from the
   q/k projections of the forward itself), with random
   native-grid teacher targets formed into Gram/attention targets on the fly.
3. ``original`` -- how the original code obtains the same quantities: batch 1, eager
   attention, ``output_attentions=True`` and ``output_hidden_states=True``, losses from
   ``hidden_states[L]`` and ``attentions[L]``.

Without ``--compile``, plain and MedAlign steps alternate (one each, repeatedly) so that
clock or thermal drift hits both alike; the MedAlign hooks are attached only for its own
steps. With ``--compile`` they run as two blocks, each after ``torch._dynamo.reset()``,
because dynamo does not guard on module hooks by default (adding or removing hooks after
compilation would otherwise be silently ignored). The original variant is never compiled.

``--size 7b`` builds a random-weight LLaVA-1.5-7B-shaped model directly on the device in
bf16 (CLIP ViT-L/14-336 tower, 576 visual tokens, Llama-2-7B LLM); ``--size tiny`` builds a
small model of the same structure on the CPU. Both sizes go through the same code; only
config numbers, dtype and device differ. The cost targets of ../shared/method.md apply to
``--size 7b`` on a GPU.

Example::

    PYTHONPATH=platform python benchmarks/step_bench.py --size tiny
    PYTHONPATH=platform python benchmarks/step_bench.py --size 7b --batch 8 --json runs/bench.json
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

try:
    import medalign_platform  # noqa: F401
except ImportError:  # running from a checkout without the editable install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))
if str(Path(__file__).resolve().parent) not in sys.path:  # flops.py beside this file
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from medalign_platform.core.losses import (  # noqa: E402
    attention_distillation_loss,
    spatial_alignment_loss,
    teacher_attention_map,
    teacher_similarity,
)
from medalign_platform.core.objective import DistillSettings, MedAlignObjective  # noqa: E402
from medalign_platform.core.student import (  # noqa: E402
    IGNORE_INDEX,
    LoraSettings,
    apply_lora,
    base_model,
    check_layer,
    decoder_layers,
    image_token_id,
    visual_grid,
)
from medalign_platform.core.tap import find_visual_positions, text_query_mask  # noqa: E402

GIB = 2**30
PROMPT_TOKENS = 5  # "<s> USER :" style prefix before the image span

# ../shared/method.md cost targets for batched SDPA MedAlign (7B shape, GPU).
TARGET_TIME_RATIO = 1.05  # MedAlign ms/step <= 1.05 x plain
TARGET_MEMORY_RATIO = 1.03  # MedAlign peak <= 1.03 x plain
TARGET_VS_ORIGINAL = 2.5  # MedAlign tokens/s >= 2.5 x original

VARIANT_LABELS = {
    "plain": "plain LoRA (SDPA, LM loss)",
    "medalign": "MedAlign (SDPA + layer-L tap)",
    "original": "original (eager, all attn/hidden)",
}


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class Shape:
    """Config numbers of one benchmark size."""

    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    vision_heads: int
    image_size: int
    patch_size: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    image_token_id: int
    max_positions: int
    teacher_grid: tuple[int, int]
    teacher_dim: int


SHAPES = {
    # A small model with the LLaVA-1.5 structure, big enough for CPU timings to mean something.
    "tiny": Shape(
        vision_hidden=128, vision_intermediate=512, vision_layers=4, vision_heads=4,
        image_size=64, patch_size=4,  # 16 x 16 = 256 visual tokens
        hidden=256, intermediate=688, layers=6, heads=8, kv_heads=8,
        vocab=2048, image_token_id=2000, max_positions=2048,
        teacher_grid=(8, 8), teacher_dim=64,
    ),
    # LLaVA-1.5-7B: CLIP ViT-L/14-336 (24 x 24 = 576 visual tokens) + Llama-2-7B; the teacher
    # is a ViT-B/16 at 224 px (14 x 14 native grid, width 768).
    "7b": Shape(
        vision_hidden=1024, vision_intermediate=4096, vision_layers=24, vision_heads=16,
        image_size=336, patch_size=14,
        hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32,
        vocab=32064, image_token_id=32000, max_positions=4096,
        teacher_grid=(14, 14), teacher_dim=768,
    ),
}


def build_config(shape: Shape):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    grid = shape.image_size // shape.patch_size
    pad_token_id = shape.image_token_id + 1
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=shape.vision_hidden,
            intermediate_size=shape.vision_intermediate,
            num_hidden_layers=shape.vision_layers,
            num_attention_heads=shape.vision_heads,
            image_size=shape.image_size,
            patch_size=shape.patch_size,
            projection_dim=768,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
        ),
        text_config=LlamaConfig(
            vocab_size=shape.vocab,
            hidden_size=shape.hidden,
            intermediate_size=shape.intermediate,
            num_hidden_layers=shape.layers,
            num_attention_heads=shape.heads,
            num_key_value_heads=shape.kv_heads,
            max_position_embeddings=shape.max_positions,
            rms_norm_eps=1e-5,
            pad_token_id=pad_token_id,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=False,
            use_cache=False,  # training: no KV cache
        ),
        image_token_id=shape.image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=grid * grid,
        projector_hidden_act="gelu",
        pad_token_id=pad_token_id,
        tie_word_embeddings=False,
    )
    config.use_cache = False
    return config


def build_model(shape: Shape, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """Random-weight LLaVA built directly on ``device`` in ``dtype`` (no checkpoint)."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    config = build_config(shape)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model


# --------------------------------------------------------------------------- inputs


@dataclass
class RandomTeacherTargets:
    """Native-grid teacher outputs (the fields MedAlignObjective reads), random values."""

    patch_tokens: torch.Tensor  # [B, h*w, D_t]
    cls_attention: torch.Tensor  # [B, h*w]
    grid: tuple[int, int]

    def head(self, n: int) -> "RandomTeacherTargets":
        return RandomTeacherTargets(self.patch_tokens[:n], self.cls_attention[:n], self.grid)


def text_layout(seq_text: int) -> tuple[int, int, int]:
    """(prompt, question, answer) token counts for ``seq_text`` text tokens."""
    answer = max(1, seq_text // 4)
    question = seq_text - PROMPT_TOKENS - answer
    if question < 1:
        raise ValueError(f"--seq-text must be >= {PROMPT_TOKENS + 2} (prompt + question + answer), got {seq_text}")
    return PROMPT_TOKENS, question, answer


def make_batch(model, batch_size: int, seq_text: int, device, dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """A LLaVA training batch: prompt, one contiguous image span, question, answer.

    Labels are -100 everywhere except on the answer tokens; the attention mask is all ones;
    pixel values are random at the vision tower's image size.
    """
    config = base_model(model).config
    image_id = image_token_id(model)
    grid = visual_grid(model)
    num_visual = grid[0] * grid[1]
    prompt, question, answer = text_layout(seq_text)
    generator = torch.Generator().manual_seed(seed)
    low = 3  # after <pad>/<unk>/<s>-style ids
    high = min(image_id, config.text_config.vocab_size)

    def words(n: int) -> torch.Tensor:
        return torch.randint(low, high, (batch_size, n), generator=generator)

    prefix = words(prompt)
    prefix[:, 0] = 1  # <s>
    image = torch.full((batch_size, num_visual), image_id, dtype=torch.long)
    answer_ids = words(answer)
    input_ids = torch.cat([prefix, image, words(question), answer_ids], dim=1)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, -answer:] = answer_ids
    size = config.vision_config.image_size
    pixel_values = torch.randn(batch_size, 3, size, size, generator=generator)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
        "pixel_values": pixel_values.to(device=device, dtype=dtype),
        "labels": labels.to(device),
    }


def random_teacher(batch_size: int, shape: Shape, device, seed: int = 1) -> RandomTeacherTargets:
    generator = torch.Generator().manual_seed(seed)
    patches = shape.teacher_grid[0] * shape.teacher_grid[1]
    tokens = torch.randn(batch_size, patches, shape.teacher_dim, generator=generator)
    attention = torch.softmax(torch.randn(batch_size, patches, generator=generator), dim=-1)
    return RandomTeacherTargets(tokens.to(device), attention.to(device), shape.teacher_grid)


def slice_batch(batch: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    return {key: value[:n] for key, value in batch.items()}


# --------------------------------------------------------------------------- the original approach


def original_terms(model, batch, teacher, settings: DistillSettings) -> dict[str, torch.Tensor]:
    """MedAlign's loss terms the way the original code gets its quantities.

    One forward with eager attention returning every layer's attentions and hidden states;
    the visual states are ``hidden_states[L]`` on the image span and the student attention
    is ``attentions[L]`` averaged over heads and over the prompt-text query rows, restricted
    to the image columns. The model must already use eager attention.
    """
    output = model(**batch, output_attentions=True, output_hidden_states=True)
    depth = len(decoder_layers(model))
    if output.hidden_states is None or len(output.hidden_states) != depth + 1 or output.attentions is None:
        raise RuntimeError("the model did not return all hidden states and attentions; is it on eager attention?")
    hidden = output.hidden_states[settings.layer]  # [B, T, D], the input of block L
    attentions = output.attentions[settings.layer]  # [B, heads, T, T]
    grid = visual_grid(model)
    input_ids = batch["input_ids"]
    seq_len = input_ids.shape[1]
    positions = find_visual_positions(input_ids, image_token_id(model), grid[0] * grid[1])
    queries = text_query_mask(positions, batch.get("attention_mask"), batch.get("labels"), seq_len)
    visual = hidden.gather(1, positions[:, :, None].expand(-1, -1, hidden.shape[-1]))
    per_row = attentions.float().mean(dim=1)  # [B, T, T], averaged over heads
    rows = (per_row * queries[:, :, None]).sum(dim=1) / queries.sum(dim=1, keepdim=True)  # [B, T]
    student_attention = rows.gather(1, positions)  # [B, N]
    similarity = teacher_similarity(teacher.patch_tokens, teacher.grid, grid)
    teacher_attention = teacher_attention_map(
        teacher.cls_attention, teacher.grid, grid, max_normalize=settings.teacher_max_normalize
    )
    lm = output.loss
    spatial = spatial_alignment_loss(visual, similarity)
    attention = attention_distillation_loss(student_attention, teacher_attention, normalize=settings.attention_normalize)
    loss = lm + settings.lambda_align * spatial + settings.lambda_attn * attention
    return {"loss": loss, "lm": lm.detach(), "spatial": spatial.detach(), "attention": attention.detach()}


# --------------------------------------------------------------------------- timing


@dataclass
class Record:
    """Per-variant measurements."""

    name: str
    batch: int
    seq_len: int
    times: list[float]
    peaks: list[int]
    terms: dict[str, float] | None = None
    error: str | None = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(record: Record, step: Callable[[], dict], device: torch.device, optimizer, measure: bool) -> None:
    """Runs one training step; appends its time (and GPU peak) to ``record`` when ``measure``."""
    if record.error is not None:
        return
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    try:
        terms = step()
        _sync(device)
    except torch.OutOfMemoryError:
        record.error = "out of memory"
    elapsed = time.perf_counter() - start
    if record.error is not None:
        # Outside the except block, so the failed step's frames (and tensors) are gone.
        optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return
    if measure:
        record.times.append(elapsed)
        if device.type == "cuda":
            record.peaks.append(torch.cuda.max_memory_allocated(device))
    record.terms = {key: float(value) for key, value in terms.items()}


def summarise(record: Record) -> dict:
    out = {
        "label": VARIANT_LABELS[record.name],
        "batch": record.batch,
        "seq_len": record.seq_len,
        "error": record.error,
        "ms_per_step": None,
        "tokens_per_s": None,
        "peak_gib": None,
        "step_ms": [t * 1e3 for t in record.times],
        "terms": record.terms,
    }
    if record.error is None and record.times:
        seconds = statistics.median(record.times)
        out["ms_per_step"] = seconds * 1e3
        out["ms_per_step_mean"] = statistics.fmean(record.times) * 1e3
        out["tokens_per_s"] = record.batch * record.seq_len / seconds
        if record.peaks:
            out["peak_gib"] = max(record.peaks) / GIB
    return out


def _ratio(numerator, denominator):
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def compute_ratios(variants: dict[str, dict]) -> dict[str, float | None]:
    plain, medalign = variants["plain"], variants["medalign"]
    original = variants.get("original", {})
    return {
        "time_medalign_over_plain": _ratio(medalign["ms_per_step"], plain["ms_per_step"]),
        "memory_medalign_over_plain": _ratio(medalign["peak_gib"], plain["peak_gib"]),
        "throughput_medalign_over_original": _ratio(medalign["tokens_per_s"], original.get("tokens_per_s")),
    }


# --------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SHAPES), default="tiny", help="tiny (CPU-sized) or 7b (LLaVA-1.5-7B shape)")
    parser.add_argument("--batch", type=int, default=None, help="batch for plain/MedAlign (default 8 for 7b, 4 for tiny)")
    parser.add_argument("--seq-text", type=int, default=98, help="text tokens besides the image span (default 98)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 10 for 7b, 4 for tiny)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps per variant (default 3 / 1)")
    parser.add_argument("--layer", type=int, default=None, help="distillation layer L (default 20 for 7b, depth//2 for tiny)")
    parser.add_argument("--lora-rank", type=int, default=64)
    parser.add_argument("--lora-alpha", type=float, default=16.0)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model for plain and MedAlign")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense peak for MFU (default 989.4, the H200's bf16, on a GPU; none on the CPU)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto", help="auto: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--skip-original", action="store_true", help="skip the eager/all-attentions batch-1 variant")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    seven_b = args.size == "7b"
    if args.batch is None:
        args.batch = 8 if seven_b else 4
    if args.steps is None:
        args.steps = 10 if seven_b else 4
    if args.warmup is None:
        args.warmup = 3 if seven_b else 1
    if args.batch < 1 or args.steps < 1 or args.warmup < 0:
        parser.error("--batch and --steps must be >= 1 and --warmup >= 0")
    try:
        text_layout(args.seq_text)
    except ValueError as error:
        parser.error(str(error))
    return args


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _fmt(value, spec: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


def report(results: dict) -> str:
    meta = results["meta"]
    lines = [
        f"device: {meta['device_name']} ({meta['device']}), torch {meta['torch']}, transformers {meta['transformers']}, "
        f"peft {meta['peft']}",
        f"model: --size {meta['size']}, {meta['dtype']}, {meta['llm_layers']} LLM layers x hidden {meta['hidden']}, "
        f"visual grid {meta['visual_grid'][0]}x{meta['visual_grid'][1]}, {meta['params_m']:.1f}M params, "
        f"{meta['trainable_params_m']:.2f}M trainable (LoRA r={meta['lora_rank']}), layer L={meta['layer']}, "
        f"compile={meta['compile']}",
        f"timing: median of {meta['steps']} steps after {meta['warmup']} warm-up, "
        + ("plain/MedAlign alternating (ABBA)" if not meta["compile"] else "plain then MedAlign blocks (dynamo reset between)"),
        "",
        f"{'variant':<36} {'batch':>5} {'seq':>5} {'ms/step':>10} {'tokens/s':>10} {'peak GiB':>9}",
    ]
    for name, row in results["variants"].items():
        if row["error"]:
            lines.append(f"{row['label']:<36} {row['batch']:>5} {row['seq_len']:>5} {row['error']:>31}")
            continue
        lines.append(
            f"{row['label']:<36} {row['batch']:>5} {row['seq_len']:>5} {_fmt(row['ms_per_step'], '10.1f'):>10} "
            f"{_fmt(row['tokens_per_s'], ',.0f'):>10} {_fmt(row['peak_gib'], '9.2f'):>9}"
        )
    lines.append("")
    for name in ("medalign", "original"):
        terms = results["variants"].get(name, {}).get("terms")
        if terms:
            text = ", ".join(f"{key} {value:.4g}" for key, value in terms.items())
            lines.append(f"{name} loss terms (last step): {text}")
    lines.append("")
    ratios, judged = results["ratios"], results["targets_judged"]
    rows = [
        ("MedAlign / plain time", ratios["time_medalign_over_plain"], f"<= {TARGET_TIME_RATIO}", "x"),
        ("MedAlign / plain peak memory", ratios["memory_medalign_over_plain"], f"<= {TARGET_MEMORY_RATIO}", "x"),
        ("MedAlign / original tokens/s", ratios["throughput_medalign_over_original"], f">= {TARGET_VS_ORIGINAL}", "x"),
    ]
    keys = ("time_medalign_over_plain", "memory_medalign_over_plain", "throughput_medalign_over_original")
    for (label, value, target, unit), key in zip(rows, keys):
        if not judged:
            verdict = "(targets apply to --size 7b on a GPU)"
        else:
            met = results["targets_met"][key]
            verdict = "n/a" if met is None else ("MET" if met else "NOT MET")
        lines.append(f"{label:<30} {_fmt(value, '.3f') + (unit if value is not None else ''):>8}   method.md target {target:<7} {verdict}")
    mfus = ", ".join(f"{name} {_fmt(row.get('tflops'), '.2f')} TFLOP/s"
                     + (f" = {row['mfu']:.1%} MFU" if row.get("mfu") is not None else "")
                     for name, row in results["variants"].items() if not row["error"])
    lines.append(f"model FLOPs: {meta['flops_per_sample'] / 1e12:.3f} TFLOP/sample (benchmarks/flops.py); {mfus}"
                 + (f" of {meta['peak_tflops']:.1f} peak" if meta["peak_tflops"] else ""))
    if meta["device"] == "cpu":
        lines.append("peak memory: n/a on CPU (no per-step allocator peak to read; measure on a GPU)")
    lines.append(
        "method.md H100 anchors (7b, 674 tokens): plain b8 659.2 ms / 67.4 GiB, hooks b8 664.4 ms / 67.7 GiB; "
        "compiled b8 414.6 / 415.8 ms; original (eager, b1) 216.0 ms = 3,121 tokens/s"
    )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    import peft
    import transformers

    device = resolve_device(args.device)
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    shape = SHAPES[args.size]
    layer = args.layer if args.layer is not None else (20 if args.size == "7b" else shape.layers // 2)

    model = build_model(shape, device, dtype, seed=args.seed)
    check_layer(layer, len(decoder_layers(model)))
    model = apply_lora(model, LoraSettings(rank=args.lora_rank, alpha=args.lora_alpha, dropout=0.05))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-4, weight_decay=0.0)
    settings = DistillSettings(layer=layer, lambda_align=1.0, lambda_attn=0.06)

    grid = visual_grid(model)
    seq_len = grid[0] * grid[1] + args.seq_text
    batch = make_batch(model, args.batch, args.seq_text, device, dtype, seed=args.seed)
    teacher = random_teacher(args.batch, shape, device, seed=args.seed + 1)
    runner = torch.compile(model, backend=args.compile_backend) if args.compile else model

    def plain_step():
        output = runner(**batch)
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {"loss": output.loss.detach(), "lm": output.loss.detach()}

    def medalign_step(objective):
        terms = objective(batch, teacher)
        terms["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {key: value.detach() for key, value in terms.items()}

    plain = Record("plain", args.batch, seq_len, [], [])
    medalign = Record("medalign", args.batch, seq_len, [], [])

    def one_medalign(measure: bool) -> None:
        # The hooks live only for this step, so plain steps run without them.
        objective = MedAlignObjective(runner, settings)
        try:
            timed_step(medalign, lambda: medalign_step(objective), device, optimizer, measure)
        finally:
            objective.remove()

    if not args.compile:
        for _ in range(args.warmup):
            timed_step(plain, plain_step, device, optimizer, measure=False)
            one_medalign(measure=False)
        for i in range(args.steps):  # ABBA order, so neither variant always runs first
            if i % 2 == 0:
                timed_step(plain, plain_step, device, optimizer, measure=True)
                one_medalign(measure=True)
            else:
                one_medalign(measure=True)
                timed_step(plain, plain_step, device, optimizer, measure=True)
    else:
        torch._dynamo.reset()
        for i in range(args.warmup + args.steps):
            timed_step(plain, plain_step, device, optimizer, measure=i >= args.warmup)
        torch._dynamo.reset()
        objective = MedAlignObjective(runner, settings)
        try:
            for i in range(args.warmup + args.steps):
                timed_step(medalign, lambda: medalign_step(objective), device, optimizer, measure=i >= args.warmup)
        finally:
            objective.remove()
        torch._dynamo.reset()
    records = [plain, medalign]

    if not args.skip_original:
        original = Record("original", 1, seq_len, [], [])
        one = slice_batch(batch, 1)
        one_teacher = teacher.head(1)

        def original_step():
            terms = original_terms(model, one, one_teacher, settings)
            terms["loss"].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return {key: value.detach() for key, value in terms.items()}

        base = base_model(model)
        base.set_attn_implementation("eager")
        try:
            for i in range(args.warmup + args.steps):
                timed_step(original, original_step, device, optimizer, measure=i >= args.warmup)
        finally:
            base.set_attn_implementation("sdpa")
        records.append(original)

    variants = {record.name: summarise(record) for record in records}
    import flops

    sample = flops.sample_flops(model, seq_len)
    peak = args.peak_tflops if args.peak_tflops is not None else (
        flops.H200_BF16_DENSE_TFLOPS if device.type == "cuda" else None)
    for row in variants.values():
        rate = row["tokens_per_s"] / seq_len if row["tokens_per_s"] else None
        row["tflops"] = sample["total"] * rate / 1e12 if rate else None
        row["mfu"] = flops.mfu(sample["total"], rate, peak)
    ratios = compute_ratios(variants)
    judged = device.type == "cuda" and args.size == "7b"
    targets_met = {
        "time_medalign_over_plain": None if ratios["time_medalign_over_plain"] is None
        else ratios["time_medalign_over_plain"] <= TARGET_TIME_RATIO,
        "memory_medalign_over_plain": None if ratios["memory_medalign_over_plain"] is None
        else ratios["memory_medalign_over_plain"] <= TARGET_MEMORY_RATIO,
        "throughput_medalign_over_original": None if ratios["throughput_medalign_over_original"] is None
        else ratios["throughput_medalign_over_original"] >= TARGET_VS_ORIGINAL,
    }
    meta = {
        "size": args.size,
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "dtype": str(dtype).replace("torch.", ""),
        "llm_layers": shape.layers,
        "hidden": shape.hidden,
        "visual_grid": list(grid),
        "teacher_grid": list(shape.teacher_grid),
        "teacher_dim": shape.teacher_dim,
        "seq_len": seq_len,
        "seq_text": args.seq_text,
        "layer": layer,
        "lora_rank": args.lora_rank,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "trainable_params_m": sum(p.numel() for p in trainable) / 1e6,
        "compile": bool(args.compile),
        "steps": args.steps,
        "warmup": args.warmup,
        "lambda_align": settings.lambda_align,
        "lambda_attn": settings.lambda_attn,
        "compile_backend": args.compile_backend if args.compile else None,
        "flops_per_sample": sample["total"],
        "flops_params": sample["params"],
        "peak_tflops": peak,
    }
    return {
        "meta": meta,
        "variants": variants,
        "ratios": ratios,
        "targets": {
            "time_medalign_over_plain": TARGET_TIME_RATIO,
            "memory_medalign_over_plain": TARGET_MEMORY_RATIO,
            "throughput_medalign_over_original": TARGET_VS_ORIGINAL,
        },
        "targets_judged": judged,
        "targets_met": targets_met if judged else None,
    }


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
