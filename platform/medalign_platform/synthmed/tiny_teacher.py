"""Tiny random open_clip teachers for tests and demos (no download needed).

Two on-disk layouts are produced, matching how real expert teachers are shipped:

* ``tiny_teacher``: an open_clip *local-dir* (``open_clip_config.json`` +
  ``open_clip_model.safetensors``), loaded as ``"local-dir:<dir>"``; the same layout
  BiomedCLIP uses on the Hugging Face hub (``hf-hub:``).
* ``tiny_teacher_checkpoint``: a registered model-config name plus one weights file,
  loaded as ``create_model_and_transforms(name, pretrained=<file>)``; the UniMed-CLIP
  style.

Weights are random but deterministic given ``seed``; the global torch RNG state is left
untouched.
"""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import torch
from safetensors.torch import save_file

__all__ = ["tiny_teacher", "tiny_teacher_checkpoint", "tiny_teacher_config"]

# The default open_clip BPE tokenizer ships with the package, so the text tower only
# needs its vocabulary size; a short context keeps the text forward cheap (defaults of
# tiny_teacher_config's text arguments).
_TEXT_CFG = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def tiny_teacher_config(
    *,
    image_size: int = 64,
    patch_size: int = 8,
    width: int = 64,
    layers: int = 2,
    heads: int = 2,
    embed_dim: int = 64,
    timm_model_name: str | None = None,
    pos_embed_type: str | None = None,
    context_length: int = _TEXT_CFG["context_length"],
    text_width: int = _TEXT_CFG["width"],
    text_layers: int = _TEXT_CFG["layers"],
    text_heads: int = _TEXT_CFG["heads"],
) -> dict:
    """Returns an open_clip ``model_cfg`` dict for a tiny CLIP.

    The one builder of tiny open_clip configs: the random teachers here and the trained
    SynthMed expert CLIP (:data:`~medalign_platform.synthmed.expert_clip.EXPERT_CLIP_ARCH`)
    both come from it. The text tower uses open_clip's default BPE tokenizer (vocabulary
    49408), so only its size is set here.

    Args:
        image_size: Input side S in pixels; the patch grid is ``S // patch_size``.
        patch_size: ViT patch side (native tower only).
        width: Vision transformer width D_t (native tower only).
        layers: Number of vision transformer blocks (native tower only).
        heads: Number of attention heads; must divide ``width`` (native tower only).
        embed_dim: Joint image-text embedding size.
        timm_model_name: If set, a BiomedCLIP-style timm vision tower
            (``TimmModel``, CLS-token pooling, linear projection, random init) replaces
            the native open_clip ``VisionTransformer``; the ``patch_size``/``width``/
            ``layers``/``heads``/``pos_embed_type`` arguments are then ignored (the timm
            name fixes them).
        pos_embed_type: the native tower's position table, ``"learnable"`` or
            ``"sin_cos_2d"``; None leaves open_clip's default (learnable) and the key unset.
        context_length, text_width, text_layers, text_heads: text transformer size; the
            defaults keep the text forward cheap for tests (16 tokens, width 32, 1 layer).
    """
    if timm_model_name is not None:
        vision_cfg = {
            "timm_model_name": timm_model_name,
            "timm_model_pretrained": False,
            "timm_pool": "",  # timm default pooling for ViTs = CLS token, as BiomedCLIP
            "timm_proj": "linear",
            "image_size": image_size,
        }
    else:
        if width % heads:
            raise ValueError(f"heads={heads} must divide width={width}")
        vision_cfg = {
            "image_size": image_size,
            "patch_size": patch_size,
            "width": width,
            "layers": layers,
            # open_clip derives the head count as width // head_width.
            "head_width": width // heads,
        }
        if pos_embed_type is not None:
            vision_cfg["pos_embed_type"] = pos_embed_type
    text_cfg = {"context_length": context_length, "vocab_size": _TEXT_CFG["vocab_size"],
                "width": text_width, "heads": text_heads, "layers": text_layers}
    return {"embed_dim": embed_dim, "vision_cfg": vision_cfg, "text_cfg": text_cfg}


def _preprocess_cfg(image_size: int) -> dict:
    return {
        "size": image_size,
        "mode": "RGB",
        "mean": list(_CLIP_MEAN),
        "std": list(_CLIP_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }


def _random_state_dict(model_cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    # fork_rng keeps the caller's global RNG stream unchanged.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(**model_cfg)
    # safetensors refuses shared storage; clone so every tensor owns its bytes.
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def tiny_teacher(
    out_dir: str | Path,
    *,
    image_size: int = 64,
    patch_size: int = 8,
    width: int = 64,
    layers: int = 2,
    heads: int = 2,
    embed_dim: int = 64,
    seed: int = 0,
    timm_model_name: str | None = None,
) -> Path:
    """Writes a tiny random CLIP in open_clip's local-dir format.

    Load it back with ``open_clip.create_model_and_transforms("local-dir:" + str(dir))``
    or ``medalign_platform.core.teacher.load_teacher("local-dir:" + str(dir))``.

    Args:
        out_dir: Directory to create (parents too); existing files are overwritten.
        image_size, patch_size, width, layers, heads, embed_dim, timm_model_name:
            See ``tiny_teacher_config``. Defaults give an (8, 8) patch grid, D_t = 64.
        seed: Weight-initialisation seed; same seed gives bit-identical weights.

    Returns:
        ``out_dir`` as a ``Path``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_cfg = tiny_teacher_config(
        image_size=image_size, patch_size=patch_size, width=width, layers=layers,
        heads=heads, embed_dim=embed_dim, timm_model_name=timm_model_name,
    )
    config = {"model_cfg": model_cfg, "preprocess_cfg": _preprocess_cfg(image_size)}
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    save_file(_random_state_dict(model_cfg, seed), str(out / "open_clip_model.safetensors"))
    return out


def tiny_teacher_checkpoint(
    out_dir: str | Path,
    *,
    name: str = "medalign-tiny-clip",
    image_size: int = 64,
    patch_size: int = 8,
    width: int = 64,
    layers: int = 2,
    heads: int = 2,
    embed_dim: int = 64,
    seed: int = 0,
    timm_model_name: str | None = None,
) -> tuple[str, Path]:
    """Writes a tiny CLIP as a named config plus one weights file (UniMed-CLIP style).

    The config ``<out_dir>/<name>.json`` is registered with ``open_clip.add_model_config``
    (process-global), so afterwards
    ``open_clip.create_model_and_transforms(name, pretrained=str(weights))`` works. With
    equal arguments the weights equal those written by ``tiny_teacher``.

    Args:
        out_dir: Directory to create; receives ``<name>.json`` and
            ``<name>.safetensors``.
        name: Model-config name to register; pick a unique one per configuration, since
            open_clip's registry is keyed by name.
        (others): As for ``tiny_teacher``.

    Returns:
        ``(name, weights_path)``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_cfg = tiny_teacher_config(
        image_size=image_size, patch_size=patch_size, width=width, layers=layers,
        heads=heads, embed_dim=embed_dim, timm_model_name=timm_model_name,
    )
    config_path = out / f"{name}.json"
    config_path.write_text(json.dumps(model_cfg, indent=2))
    weights = out / f"{name}.safetensors"
    # open_clip picks its loader by extension: .safetensors never goes through torch.load.
    save_file(_random_state_dict(model_cfg, seed), str(weights))
    open_clip.add_model_config(config_path)
    return name, weights
