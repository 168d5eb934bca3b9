"""Measured peak GPU memory of MedAlign training steps on random-weight 7B shapes.

Builds LLaVA-1.5-7B and LLaVA-Med v1.5 (converted) from the values of their released
config.json (``tests/real_configs.py``) directly on the GPU in bf16, puts LoRA on every LLM
linear, attaches the MedAlign objective (tap at layer 20, both losses on) and AdamW, and for
each (batch, gradient checkpointing) runs one warm-up step (AdamW allocates its state) and
one measured step: ``torch.cuda.max_memory_allocated`` over forward + backward + optimizer
step, and the memory allocated before it (weights + LoRA/AdamW state). Prints JSON lines and
the preflight estimate beside each measurement.

    PYTHONPATH=platform python benchmarks/memory_probe.py --json runs/memory_probe.json

Needs a CUDA GPU with ~70 GiB (batch 8 without checkpointing); the figures depend on the
GPU, driver and library versions, which are recorded with them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "platform"), str(ROOT / "tests")]

from real_configs import LLAVA_15_7B_HF, llava_med_converted_config  # noqa: E402

from medalign_platform.core.objective import DistillSettings, MedAlignObjective  # noqa: E402
from medalign_platform.core.student import LoraSettings, apply_lora, enable_gradient_checkpointing  # noqa: E402
from medalign_platform.run.memory import estimate_memory  # noqa: E402

GIB = 2**30
SHAPES = {
    # name: (config dict, LoRA rank) -- r=64 is method.md's anchor setting, r=32 the VQA-RAD recipe.
    "llava-1.5-7b": (LLAVA_15_7B_HF, 64),
    "llava-med-v1.5-mistral-7b": (llava_med_converted_config(), 32),
}


def llava_config(raw: dict):
    from transformers import LlavaConfig

    values = json.loads(json.dumps(raw))
    config = LlavaConfig(**{k: v for k, v in values.items() if k not in ("architectures", "model_type")})
    config.use_cache = False
    config.text_config.use_cache = False
    return config


def batch_for(config, batch_size: int, text_tokens: int, device) -> dict:
    grid = config.vision_config.image_size // config.vision_config.patch_size
    image = config.image_token_id
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 30000, (batch_size, 8), generator=generator)
    question = torch.randint(3, 30000, (batch_size, text_tokens - 8 - 16), generator=generator)
    answer = torch.randint(3, 30000, (batch_size, 16), generator=generator)
    ids = torch.cat([prompt, torch.full((batch_size, grid * grid), image), question, answer], dim=1)
    labels = torch.full_like(ids, -100)
    labels[:, -16:] = answer
    size = config.vision_config.image_size
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": labels.to(device),
            "pixel_values": torch.randn(batch_size, 3, size, size, generator=generator).to(device, torch.bfloat16)}


class Targets:
    def __init__(self, batch_size: int, device):
        generator = torch.Generator().manual_seed(1)
        self.patch_tokens = torch.randn(batch_size, 196, 768, generator=generator).to(device)
        self.cls_attention = torch.softmax(torch.randn(batch_size, 196, generator=generator), -1).to(device)
        self.grid = (14, 14)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--batches", default="1,4,8", help="micro-batches without checkpointing")
    parser.add_argument("--ckpt-batches", default="8,16", help="micro-batches with gradient checkpointing")
    parser.add_argument("--text-tokens", type=int, default=98, help="text tokens per sample (576 image tokens added)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from transformers import LlavaForConditionalGeneration
    import peft
    import transformers

    device = torch.device("cuda")
    meta = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__}
    print(json.dumps(meta), flush=True)
    rows = []
    for shape in args.shapes.split(","):
        raw, rank = SHAPES[shape]
        config = llava_config(raw)
        lora = LoraSettings(rank=rank, alpha=16, dropout=0.05)
        torch.manual_seed(0)
        tick = time.perf_counter()
        with torch.device(device):
            model = LlavaForConditionalGeneration._from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
        model = apply_lora(model, lora)
        objective = MedAlignObjective(model, DistillSettings(layer=20, lambda_align=1.0, lambda_attn=0.06))
        optimizer = torch.optim.AdamW(objective.trainable_parameters(), lr=1e-5)
        model.train()
        build_s = time.perf_counter() - tick
        plan = [(b, False) for b in map(int, args.batches.split(","))] + \
               [(b, True) for b in map(int, args.ckpt_batches.split(",") if args.ckpt_batches else [])]
        with torch.device("meta"):
            meta_model = LlavaForConditionalGeneration(config)
        for batch_size, ckpt in plan:
            if ckpt:
                enable_gradient_checkpointing(model)
            batch = batch_for(config, batch_size, args.text_tokens, device)
            targets = Targets(batch_size, device)
            for measured in (False, True):
                optimizer.zero_grad(set_to_none=True)
                torch.cuda.synchronize()
                before = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                try:
                    terms = objective(batch, targets)
                    terms["loss"].backward()
                    optimizer.step()
                except torch.OutOfMemoryError:
                    peak = None
                    optimizer.zero_grad(set_to_none=True)
                    torch.cuda.empty_cache()
                    break
                torch.cuda.synchronize()
                seconds = time.perf_counter() - start
                peak = torch.cuda.max_memory_allocated()
            estimate = estimate_memory(config, lora=lora, batch_size=batch_size, seq_len=batch["input_ids"].shape[1],
                                       gradient_checkpointing=ckpt, meta_model=meta_model)
            row = {"shape": shape, "lora_rank": rank, "batch": batch_size, "tokens": int(batch["input_ids"].shape[1]),
                   "checkpointing": ckpt, "static_gib": before / GIB, "peak_gib": None if peak is None else peak / GIB,
                   "step_s": seconds if peak is not None else None, "estimate_gib": estimate.gib(),
                   "estimate_static_gib": (estimate.weights + estimate.trainable_state) / GIB,
                   "build_s": build_s, **meta}
            if peak is not None:
                row["estimate_error"] = estimate.gib() / row["peak_gib"] - 1
            rows.append(row)
            print(json.dumps(row), flush=True)
        del model, objective, optimizer
        torch.cuda.empty_cache()
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
