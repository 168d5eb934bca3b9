"""Model FLOPs of one LoRA training sample of a LLaVA-style student, and MFU.

What a LoRA step computes (frozen base weights, LoRA adapters in every LLM block):

* LLM linear layers (all decoder-block projections plus ``lm_head``, ``N_llm`` weights):
  forward ``2 N_llm`` FLOPs per token; backward only the input gradients (the weights are
  frozen), another ``2 N_llm``: **4 N_llm per token**, not the usual 6.
* LoRA weights (``N_lora``): forward, input and weight gradients: **6 N_lora per token**.
* LLM attention (no weights): ``QK^T`` and ``AV`` cost ``4 T d`` FLOPs per token and layer
  forward (counted over the full ``T x T``, as PaLM's MFU does; causal kernels skip about
  half), times 3 with the backward: **12 L d T per token**.
* Vision tower and projector: frozen and below every trainable weight, so forward only:
  ``2 N_vision`` per patch token (CLS included) plus its attention ``4 L_v d_v P`` per patch,
  and ``2 N_projector`` per visual token.

``model_flops_per_sample = T (4 N_llm + 6 N_lora + 12 L d T) + P (2 N_vision + 4 L_v d_v P) + N_vis 2 N_projector``

MFU = model FLOPs per second / peak; the H200's dense BF16 peak is 989.4 TFLOP/s (NVIDIA's
H100/H200 SXM datasheet figure without sparsity). Embedding lookups, norms and biases (1-D weights), the softmax and
the MedAlign losses (one layer's text-query attention rows and a ``N x N`` Gram matrix per
sample) are not counted: they are below 1% of these terms at the 7B shape.
"""

from __future__ import annotations

from torch import nn

H200_BF16_DENSE_TFLOPS = 989.4


def _weights(module: nn.Module, trainable: bool | None = None, skip_embeddings: bool = True) -> int:
    total = 0
    for name, param in module.named_parameters():
        if trainable is not None and param.requires_grad != trainable:
            continue
        if skip_embeddings and "embed" in name:  # lookups, not matmuls
            continue
        if param.dim() < 2:  # norm scales and biases: no matmul
            continue
        total += param.numel()
    return total


def sample_flops(model: nn.Module, seq_len: int) -> dict:
    """Model FLOPs of one training sample of ``seq_len`` tokens (see the module docstring).

    Args:
        model: the peft-wrapped LLaVA student (LoRA applied; trainable = LoRA and steer).
        seq_len: tokens per sample, the visual span included.

    Returns:
        ``{"total", "llm", "lora", "attention", "vision", "params": {...}}`` in FLOPs.
    """
    from medalign_platform.core.student import base_model, language_model

    root = base_model(model)
    llm = language_model(root)
    text = root.config.text_config
    vision_config = root.config.vision_config
    n_llm = _weights(llm, trainable=False) + _weights(root.get_output_embeddings(), trainable=False)
    n_lora = _weights(root, trainable=True, skip_embeddings=False)
    vision = root.get_submodule("model.vision_tower") if _has(root, "model.vision_tower") else root.vision_tower
    projector = (root.get_submodule("model.multi_modal_projector") if _has(root, "model.multi_modal_projector")
                 else root.multi_modal_projector)
    n_vision = _weights(vision)
    n_projector = _weights(projector)
    side = vision_config.image_size // vision_config.patch_size
    patches = side * side + 1  # CLS
    visual_tokens = side * side
    T, L, d = seq_len, text.num_hidden_layers, text.hidden_size
    parts = {
        "llm": T * 4 * n_llm,
        "lora": T * 6 * n_lora,
        "attention": T * 12 * L * d * T,
        "vision": patches * (2 * n_vision + 4 * vision_config.num_hidden_layers * vision_config.hidden_size * patches)
        + visual_tokens * 2 * n_projector,
    }
    return {"total": sum(parts.values()), **parts,
            "params": {"llm": n_llm, "lora": n_lora, "vision": n_vision, "projector": n_projector}}


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


def mfu(flops_per_sample: float, samples_per_s: float | None, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1] (None without a throughput or a peak)."""
    if not samples_per_s or not peak_tflops:
        return None
    return flops_per_sample * samples_per_s / (peak_tflops * 1e12)
