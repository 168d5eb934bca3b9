"""Precision and memory of a run's student: weight dtype, autocast, gradient checkpointing, torch.compile.

* ``model.dtype`` -- the dtype the student's weights are loaded in
  (:func:`~medalign_platform.core.student.torch_dtype`; ``auto`` is bf16 on a GPU, fp32 on
  the CPU). Evaluation generates with the same weights.
  peft keeps LoRA weights in fp32 on a bf16/fp16 base, and the steer adapter is fp32, so
  only frozen weights are halved.
* ``trainer.precision`` -- bf16 autocast around the training forward (:func:`autocast`).
* ``trainer.gradient_checkpointing`` -- transformers' non-reentrant checkpointing of every
  decoder block (:func:`~medalign_platform.core.student.enable_gradient_checkpointing`). Non-reentrant, because the tap's
  captures are tensors produced inside the checkpointed blocks: with re-entrant
  checkpointing they would not be part of the autograd graph and the distillation losses
  would silently get no gradient.
* ``trainer.compile`` -- ``torch.compile`` of each LLM decoder block (:func:`compile_blocks`),
  the way torchtune compiles per layer: one graph per block type instead of one per model,
  so LLaVA's data-dependent image merge and the tap's span search (both at the model's
  entry) stay eager, while block L compiles together with the tap's fixed-shape hooks.
  Variable sequence lengths trigger one recompile with a dynamic length, then none
  (``tests/run/test_acceleration.py`` counts them). Evaluation runs eager
  (:func:`eager`): ``generate()``'s growing KV cache would otherwise recompile per length.
  Hooks must be attached before the first compiled call: dynamo does not guard on hooks.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from ..core.student import decoder_layers

#: The torch.compile backend of ``trainer.compile`` (tests switch it to a faster one).
COMPILE_BACKEND = "inductor"


def autocast(device: torch.device, precision: str):
    """bf16 autocast for ``trainer.precision`` bf16 (or auto on CUDA); a no-op otherwise."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def compile_blocks(model: nn.Module, backend: str | None = None) -> int:
    """``torch.compile`` every LLM decoder block in place (``nn.Module.compile``); returns how many.

    In place, so parameter names, peft's adapter saving and the checkpoints are unchanged.
    """
    # Dynamo does not guard on module hooks by default: block L (hooked) would silently reuse
    # the graph of an unhooked block, dropping the tap. With hook guards it gets its own graph.
    torch._dynamo.config.skip_nnmodule_hook_guards = False
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(backend=backend or COMPILE_BACKEND)
    return len(layers)


@contextmanager
def eager():
    """Runs compiled modules eagerly inside the block (evaluation and generation)."""
    with torch.compiler.set_stance("force_eager"):
        yield
