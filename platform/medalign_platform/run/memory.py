"""The per-trial GPU memory model of a MedAlign training step (used by ``medalign check``).

The memory model (bytes, counted from the model built on the ``meta`` device):

* weights: parameters x ``model.dtype`` size (+2 bytes/parameter when fp32 weights run
  under bf16 autocast, which caches a bf16 copy of every weight it uses);
* trainable state: LoRA and steer parameters are fp32 (peft keeps adapters in fp32), with
  their gradients and AdamW's two moments: 16 bytes per trainable parameter;
* activations saved for backward, per token and decoder layer, with the frozen base
  weights (their matmuls save no inputs) and the activation dtype ``a`` (2 for bf16):
  ``4h`` + ``4h`` (fp32 RMSNorm inputs), ``2 q_rot + 4 kv`` (rotated q, k and v kept by
  SDPA) ``+ a*q`` (SDPA output), ``3 a*i`` (SiLU input, its output and the up projection);
  each LoRA-wrapped linear keeps its fp32 input (``4 in``; peft casts to the adapter dtype)
  plus a 1-byte dropout mask when ``lora.dropout > 0``; ``eager`` attention adds
  ``6 heads T`` per token (fp32 softmax output and its bf16 copy);
* the head: the final norm input and the logits (``a V``) with the fp32 log-softmax the
  loss keeps (``4 V``), plus their fp32 gradient at the start of backward (``4 V``);
* with gradient checkpointing only each block's input (``a h`` per token and layer) is
  kept, and the peak adds one block's recomputed activations (x1.5 for the gradients in
  flight) or the head, whichever is larger;
* the MedAlign tap: one layer's q/k recompute and fp32 scores/probabilities for the
  prompt-text query rows only.

Against the measured anchors of ``/work/shared/method.md`` (random-weight LLaVA-1.5-7B, bf16,
LoRA r=64, 674 tokens) the estimate lands within a few percent: see ``docs/models.md``.
Not counted: the CUDA context and allocator fragmentation (``GPU_RESERVE_GIB`` is kept
free for them), the frozen vision tower's forward (no graph, ~30 MB per image).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["GIB", "MemoryEstimate", "build_meta_model", "estimate_memory", "student_grid"]

GIB = 2**30
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_LORA_STATE_BYTES = 16  # fp32 parameter + gradient + AdamW exp_avg + exp_avg_sq


def student_grid(config) -> tuple[int, int]:
    side = int(config.vision_config.image_size) // int(config.vision_config.patch_size)
    return (side, side)


@dataclass
class MemoryEstimate:
    """Estimated peak GPU memory of one training step on one worker (bytes)."""

    params_total: int
    params_trainable: int
    weights: int
    autocast_cache: int
    trainable_state: int
    activations: int
    transient: int
    batch_size: int
    seq_len: int
    gradient_checkpointing: bool

    @property
    def total(self) -> int:
        return self.weights + self.autocast_cache + self.trainable_state + self.activations + self.transient

    def gib(self, value: int | None = None) -> float:
        return (self.total if value is None else value) / GIB

    def describe(self) -> str:
        parts = [f"weights {self.gib(self.weights):.1f}"]
        if self.autocast_cache:
            parts.append(f"autocast copies {self.gib(self.autocast_cache):.1f}")
        parts += [f"LoRA+AdamW {self.gib(self.trainable_state):.2f}",
                  f"activations {self.gib(self.activations + self.transient):.1f}"]
        ckpt = "with" if self.gradient_checkpointing else "without"
        return (f"{self.gib():.1f} GiB ({', '.join(parts)} GiB; batch {self.batch_size} x {self.seq_len} tokens, "
                f"{ckpt} gradient checkpointing)")


def build_meta_model(config):
    """The student built on the ``meta`` device: shapes and parameter counts, no memory."""
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        return LlavaForConditionalGeneration(config)


def _unique_params(module) -> int:
    seen, total = set(), 0
    for parameter in module.parameters():
        if id(parameter) not in seen:
            seen.add(id(parameter))
            total += parameter.numel()
    return total


def _lora_shapes(model, lora) -> list[tuple[int, int]]:
    """``(in_features, out_features)`` of every LLM linear that gets LoRA."""
    from ..core.student import language_model

    layers = language_model(model).layers
    chosen = range(len(layers)) if lora.layers_to_transform is None else lora.layers_to_transform
    shapes = []
    for index in chosen:
        for name, module in layers[index].named_modules():
            if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in lora.target_modules:
                shapes.append((module.in_features, module.out_features))
    return shapes


def estimate_memory(config, *, lora, steer_mode: str = "off", steer_rank: int = 64, batch_size: int,
                    seq_len: int, query_len: int | None = None, weight_dtype: str = "bfloat16",
                    compute_dtype: str = "bfloat16", gradient_checkpointing: bool = False,
                    attn_implementation: str = "sdpa", capture_attention: bool = True,
                    meta_model=None) -> MemoryEstimate:
    """Peak GPU memory of one MedAlign training step (see the module docstring for the model).

    Args:
        config: the student's ``LlavaConfig``.
        lora: ``LoraSettings`` (rank, dropout, target modules, layers).
        steer_mode / steer_rank: the steer adapter (``off`` | ``full`` | ``low_rank``).
        batch_size / seq_len: micro-batch and tokens per sample (image tokens included).
        query_len: prompt-text rows the tap recomputes (default: ``seq_len`` minus the image).
        weight_dtype: ``model.dtype``; compute_dtype: the activation dtype (bf16 under autocast).
        gradient_checkpointing / attn_implementation / capture_attention: as configured.
        meta_model: a meta-device model of ``config`` to reuse.
    """
    model = meta_model if meta_model is not None else build_meta_model(config)
    text = config.text_config
    h = int(text.hidden_size)
    heads = int(text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or h // heads)
    q, kv = heads * head_dim, int(getattr(text, "num_key_value_heads", None) or heads) * head_dim
    i = int(text.intermediate_size)
    layers = int(text.num_hidden_layers)
    vocab = int(text.vocab_size)
    a = _DTYPE_BYTES[compute_dtype]
    w = _DTYPE_BYTES[weight_dtype]
    tokens = batch_size * seq_len

    params_total = _unique_params(model)
    lora_shapes = _lora_shapes(model, lora)
    lora_params = sum(lora.rank * (fan_in + fan_out) for fan_in, fan_out in lora_shapes)
    steer_params = {"off": 0, "full": h * h, "low_rank": 2 * h * steer_rank}[steer_mode]
    trainable = lora_params + steer_params
    weights = params_total * w
    autocast_cache = params_total * 2 if (w == 4 and a == 2) else 0

    # Saved activations per token and layer (bytes).
    base = 4 * h + 4 * h + a * q + 2 * a * kv + a * q + 3 * a * i
    mask = 1 if lora.dropout > 0 else 0
    lora_saved = 0
    per_layer_lora = _lora_shapes_per_layer(lora_shapes, layers if lora.layers_to_transform is None
                                            else len(lora.layers_to_transform))
    for fan_in, _ in per_layer_lora:
        lora_saved += (4 + mask) * fan_in + 4 * lora.rank
    lora_layers = layers if lora.layers_to_transform is None else len(lora.layers_to_transform)
    eager = 6 * heads * seq_len if attn_implementation == "eager" else 0
    per_token_layer = base + eager  # every layer
    head = 4 * h + a * vocab + 4 * vocab  # final norm input, logits, fp32 log-softmax
    head_grad = 4 * vocab
    query_len = max(1, seq_len - _num_image_tokens(config)) if query_len is None else query_len
    tap = (2 * a * (q + kv) * seq_len + 8 * heads * query_len * seq_len) * batch_size if capture_attention else 0

    full_layers = per_token_layer * layers * tokens + lora_saved * lora_layers * tokens
    if not gradient_checkpointing:
        activations = full_layers + head * tokens + tap
        transient = head_grad * tokens
    else:
        activations = a * h * layers * tokens + head * tokens + tap
        one_layer = (per_token_layer + lora_saved) * tokens
        transient = max(head_grad * tokens, int(1.5 * one_layer) - head * tokens)
    return MemoryEstimate(
        params_total=params_total, params_trainable=trainable, weights=weights, autocast_cache=autocast_cache,
        trainable_state=trainable * _LORA_STATE_BYTES, activations=int(activations), transient=int(transient),
        batch_size=batch_size, seq_len=seq_len, gradient_checkpointing=gradient_checkpointing,
    )


def _lora_shapes_per_layer(shapes: list[tuple[int, int]], num_layers: int) -> list[tuple[int, int]]:
    """The LoRA linears of one layer (all layers share the structure)."""
    if not shapes or not num_layers:
        return []
    per_layer = len(shapes) // num_layers
    return shapes[:per_layer]


def _num_image_tokens(config) -> int:
    rows, cols = student_grid(config)
    return rows * cols
