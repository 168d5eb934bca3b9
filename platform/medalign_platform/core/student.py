"""The student Med-LVLM: loading, its layout (depth, grid, image token), LoRA and the steer adapter.

The student is any LLaVA-family model that transformers loads as
``LlavaForConditionalGeneration`` / ``AutoModelForImageTextToText``; the layer-L hooks
that read it live in :mod:`medalign_platform.core.tap`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch
from torch import nn

from ..common.errors import ConfigError
from ..common.settings import Settings, setting

# LoRA goes on every linear layer of the LLM's decoder blocks, as in the original runs.
LLM_LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
IGNORE_INDEX = -100


@dataclass
class LoraSettings(Settings):
    """LoRA on the language model's linear layers (never the vision tower or projector)."""

    section: ClassVar[str] = "lora"

    rank: int = setting(32, "LoRA rank r.", ge=1)
    alpha: float = setting(16.0, "LoRA alpha; the update is scaled by alpha / r.", gt=0)
    dropout: float = setting(0.05, "Dropout on the LoRA input.", ge=0, lt=1)
    target_modules: tuple[str, ...] = setting(LLM_LINEAR_MODULES, "Names of the decoder-block linear layers that get LoRA.")
    layers_to_transform: list[int] | None = setting(None, "Decoder layer indices that get LoRA; null means all layers.")

    def check(self) -> None:
        unknown = set(self.target_modules) - set(LLM_LINEAR_MODULES)
        if unknown:
            self.fail("target_modules", f"has unknown names {sorted(unknown)}; choose from {list(LLM_LINEAR_MODULES)}")


@dataclass
class SteerSettings(Settings):
    """Optional steer adapter on the visual span at the input of block L.

    ``E_v <- E_v + eps * E_v @ W^T`` with ``W`` zero-initialised, so training starts from
    the base model. ``mode="full"`` learns a full ``D x D`` matrix (the original: 16.8M
    parameters at D=4096); ``mode="low_rank"`` learns ``W = B @ A`` of rank ``rank``.
    """

    section: ClassVar[str] = "distill.steer"

    mode: Literal["off", "full", "low_rank"] = setting("off", "off | full | low_rank.")
    rank: int = setting(64, "Rank of W = B @ A when mode=low_rank.", ge=1)
    eps: float = setting(1.0, "Scale of the steer update.")


# --------------------------------------------------------------------------- loading


def load_student(
    path_or_id: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    device: str | torch.device | None = None,
):
    """Loads a LLaVA-family student and its processor with transformers.

    Args:
        path_or_id: a directory written by ``save_pretrained`` or a hub id (hub ids need
            the files in the local HF cache when ``HF_HUB_OFFLINE=1``).
        dtype: parameter dtype (``torch.bfloat16`` on GPU).
        attn_implementation: ``"sdpa"`` (default), ``"eager"`` or ``"flash_attention_2"``.
        device: where to put the model.

    Returns:
        ``(model, processor)``.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    local = Path(path_or_id).expanduser()
    if (str(path_or_id).startswith((".", "/", "~")) or local.exists()) and not (local / "config.json").is_file():
        raise FileNotFoundError(
            f"student checkpoint {str(path_or_id)!r} has no config.json; point model.path at a directory "
            "written by save_pretrained (or build one with medalign_platform.tiny_student)."
        )
    source = str(local) if local.exists() else str(path_or_id)
    model = AutoModelForImageTextToText.from_pretrained(
        source, dtype=dtype, attn_implementation=attn_implementation
    )
    processor = AutoProcessor.from_pretrained(source)
    if device is not None:
        model.to(device)
    return model, processor


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str | torch.dtype, device: str | torch.device | None = None) -> torch.dtype:
    """``model.dtype`` (``auto`` | ``float32`` | ``bfloat16`` | ``float16``) as a torch dtype.

    ``auto`` is bfloat16 on a CUDA ``device`` and float32 anywhere else (the CPU has no
    fast bf16 matmuls, and a GPU run in fp32 weights would double their memory).
    """
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.bfloat16 if device is not None and torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"model.dtype={name!r}: choose auto or one of {sorted(DTYPES)}")
    return DTYPES[name]


def check_expected_layout(model: nn.Module, *, grid=None, vision_feature_layer=None) -> None:
    """Checks a preset's declared ``model.grid`` / ``model.vision_feature_layer`` against the
    loaded checkpoint (``None`` skips a check), so a preset never silently runs another model."""
    actual = visual_grid(model)
    if grid is not None and tuple(grid) != actual:
        raise ValueError(f"model.grid={list(grid)} but the checkpoint's vision tower gives a {actual[0]}x{actual[1]} "
                         "grid; fix model.grid (or set it to null) or model.path")
    layer = getattr(base_model(model).config, "vision_feature_layer", None)
    if vision_feature_layer is not None and layer != vision_feature_layer:
        raise ValueError(f"model.vision_feature_layer={vision_feature_layer} but the checkpoint uses {layer}; "
                         "fix the preset (or set it to null)")


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing of the decoder blocks (``trainer.gradient_checkpointing``).

    The distillation tap's pre-hook on block L runs again during the recomputation, which
    re-applies the steer adapter exactly as in the forward pass.
    """
    root = base_model(model)
    enable = getattr(root, "activation_checkpointing_enable", None)  # transformers >= 5.x name
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        root.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model under an optional peft wrapper."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def language_model(model: nn.Module) -> nn.Module:
    """The LLM decoder (the module holding ``layers``) of a LLaVA-family model."""
    root = base_model(model)
    for path in ("model.language_model", "language_model.model", "language_model"):
        try:
            module = root.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(getattr(module, "layers", None), nn.ModuleList):
            return module
    raise TypeError(f"{type(root).__name__} has no language_model with decoder layers; is it a LLaVA-family model?")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return language_model(model).layers


def model_depth(model_path: str | Path) -> int:
    """Number of LLM decoder layers, read from the checkpoint's config (no weights loaded).

    A local checkpoint's ``config.json`` is read directly: every sweep trial checks its
    sampled layer with this, and importing transformers just for it costs seconds.
    """
    import json

    local = Path(model_path).expanduser() / "config.json"
    if local.is_file():
        data = json.loads(local.read_text())
        text = data.get("text_config") or data
        if isinstance(text.get("num_hidden_layers"), int):
            return int(text["num_hidden_layers"])
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_path))
    return int(getattr(config, "text_config", config).num_hidden_layers)


def check_layer(layer: int, depth: int, where: str = "the model") -> int:
    """The one check of a distillation layer: an integer in ``1 .. depth-1`` (0-based HF index).

    Layer 0's input is the embedding output, which has no block below it to steer, so the
    smallest layer is 1; ``depth`` itself does not exist.

    Raises:
        ConfigError: naming ``distill.layer``, the model's depth and the valid range.
    """
    if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer <= depth - 1:
        raise ConfigError(
            f"distill.layer={layer!r} is outside the model: {where} has {depth} decoder layers, so distill.layer "
            f"must be in 1..{depth - 1} (an integer, the 0-based HF decoder index)"
        )
    return layer


def visual_grid(model: nn.Module) -> tuple[int, int]:
    """The student's visual token grid ``(H, W)`` from its vision config."""
    config = base_model(model).config
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    return (side, side)


def image_token_id(model: nn.Module) -> int:
    config = base_model(model).config
    token_id = getattr(config, "image_token_id", None)
    if token_id is None:
        token_id = getattr(config, "image_token_index", None)
    if token_id is None:
        raise ValueError("the student's config has no image_token_id; it is not a LLaVA-family model")
    return int(token_id)


# --------------------------------------------------------------------------- LoRA


def lora_target_names(model: nn.Module, settings: LoraSettings) -> list[str]:
    """Fully qualified names of the LLM linear layers that get LoRA.

    Names are listed explicitly (rather than as suffixes) because the CLIP vision tower
    has its own ``q_proj``/``k_proj``/``v_proj`` that must stay untouched.
    """
    root = base_model(model)
    layers = language_model(root).layers
    depth = len(layers)
    chosen = range(depth) if settings.layers_to_transform is None else settings.layers_to_transform
    bad = [i for i in chosen if not 0 <= i < depth]
    if bad:
        raise ValueError(f"lora.layers_to_transform has {bad}, outside 0..{depth - 1}")
    wanted = {id(layers[i]) for i in chosen}
    names = []
    for name, module in root.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in settings.target_modules:
            # Walk up to the decoder block that owns this linear layer.
            parent = name.split(".")
            for cut in range(len(parent) - 1, 0, -1):
                owner = root.get_submodule(".".join(parent[:cut]))
                if id(owner) in wanted:
                    names.append(name)
                    break
    if not names:
        raise ValueError(f"no linear layers named {settings.target_modules} found in the LLM")
    return names


def apply_lora(model: nn.Module, settings: LoraSettings):
    """Wraps ``model`` with peft LoRA on the LLM's linear layers; everything else is frozen."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=lora_target_names(model, settings),
        bias="none",
    )
    return get_peft_model(model, config)


# --------------------------------------------------------------------------- steer


class SteerAdapter(nn.Module):
    """``E_v + eps * E_v @ W^T`` on the visual span, with ``W`` zero at initialisation.

    Args:
        hidden_size: the LLM width ``D``.
        settings: mode (full / low_rank), rank and eps.
    """

    def __init__(self, hidden_size: int, settings: SteerSettings):
        super().__init__()
        if settings.mode == "off":
            raise ValueError("SteerAdapter built with mode=off; build none instead")
        self.mode = settings.mode
        self.eps = settings.eps
        if settings.mode == "full":
            self.weight = nn.Parameter(torch.zeros(hidden_size, hidden_size))
        else:
            # LoRA-style: B = 0 makes W = B @ A zero, A random so gradients reach B at once.
            self.down = nn.Parameter(torch.empty(settings.rank, hidden_size))
            self.up = nn.Parameter(torch.zeros(hidden_size, settings.rank))
            nn.init.kaiming_uniform_(self.down, a=5**0.5)

    def forward(self, visual: torch.Tensor) -> torch.Tensor:
        """Returns the steer *update* ``eps * E_v @ W^T`` for ``visual`` ``[B, N, D]``."""
        if self.mode == "full":
            update = visual @ self.weight.to(visual.dtype).T
        else:
            update = (visual @ self.down.to(visual.dtype).T) @ self.up.to(visual.dtype).T
        return self.eps * update


def attach_steer(model: nn.Module, settings: SteerSettings) -> SteerAdapter | None:
    """Creates the steer adapter (or None for mode=off) as a trainable submodule of the model."""
    if settings.mode == "off":
        return None
    root = base_model(model)
    steer = SteerAdapter(root.config.text_config.hidden_size, settings)
    steer.to(next(root.parameters()).device)
    root.add_module("medalign_steer", steer)
    steer.requires_grad_(True)
    return steer
