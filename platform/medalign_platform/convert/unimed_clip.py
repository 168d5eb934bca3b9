"""``medalign convert unimed-clip SRC.pt OUT``: a UniMed-CLIP checkpoint as an open_clip local-dir.

UniMed-CLIP (``UzairK/unimed-clip-vit-b16`` / ``-vit-l14-336``) is released as a training
checkpoint of its own open_clip fork, loaded there with ``text_encoder_name=...``, an
argument upstream open_clip does not have. Its keys (the fork's ``src/open_clip/model.py``):

* ``visual.*``: the fork's ``VisualTransformer`` -- ``conv1``, ``class_embedding``,
  ``positional_embedding``, ``ln_pre``, ``transformer.resblocks.N.{ln_1, attn.in_proj_*,
  attn.out_proj.*, ln_2, mlp.c_fc.*, mlp.c_proj.*}``, ``ln_post``, ``proj``; the same names
  and shapes as upstream open_clip's ``VisionTransformer`` with QuickGELU
  (``ViT-B-16-quickgelu`` / ``ViT-L-14-336-quickgelu``, head width 64);
* ``text_encoder.transformer.*`` (a BiomedBERT ``BertModel`` without pooler) and
  ``text_encoder.proj.{0,2}.weight`` (MLP projection, no bias, CLS pooling): upstream's
  ``HFTextEncoder`` holds exactly this as ``text.*``;
* ``logit_scale``.

The converter keeps the vision tower always and the text tower when the BERT's own files
(``config.json`` and tokenizer, e.g. ``microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract``
downloaded) are given with ``--text-encoder``; they are copied into OUT, whose
``open_clip_config.json`` then names OUT as ``hf_model_name`` (open_clip reads a local-dir's
tokenizer from the folder itself). Without it the text tower is a small zero placeholder
(open_clip always builds one) and the config says ``"medalign": {"text_tower": "absent"}``,
so the teacher refuses prompt-aware attention instead of using random text features.

The ``.pt`` is read with ``torch.load(weights_only=True)``; every tensor is accounted for
(converted, or dropped on purpose: the text tower without ``--text-encoder``, BERT's
``position_ids`` buffer), and shapes are checked against the open_clip model built on the
meta device before anything is written.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from .sources import ConversionError, TensorSource, converted_dir, write_marker

__all__ = ["convert_unimed_clip"]

KIND = "unimed-clip"
OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]  # the fork's get_mean_std(): OpenAI's
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]
HEAD_WIDTH = 64  # the fork's CLIPVisionCfg default; ViT-B/16 and ViT-L/14 both use 64-wide heads
TEXT_FILES = ("config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# Buffers older transformers saved with BERT; transformers 5 recomputes them.
_BERT_BUFFERS = re.compile(r"^text_encoder\.transformer\.embeddings\.(position_ids|token_type_ids)$")
# A zero placeholder text tower for vision-only exports (open_clip always builds a text tower).
_PLACEHOLDER_TEXT = {"context_length": 8, "vocab_size": 16, "width": 8, "heads": 1, "layers": 1}


def _vision_cfg(source: TensorSource) -> tuple[dict, int]:
    """Vision config (open_clip ``vision_cfg``) and ``embed_dim`` read off the tensor shapes."""
    width, channels, patch, patch_w = source.shape("visual.conv1.weight")
    if channels != 3 or patch != patch_w:
        raise ConversionError(f"visual.conv1.weight has shape {[width, channels, patch, patch_w]}; expected "
                              "[width, 3, p, p] (a ViT patch embedding)")
    tokens = source.shape("visual.positional_embedding")[0]
    grid = math.isqrt(tokens - 1)
    if grid * grid + 1 != tokens:
        raise ConversionError(f"visual.positional_embedding has {tokens} rows, not grid^2 + 1")
    blocks = {int(m.group(1)) for k in source.keys() if (m := re.match(r"visual\.transformer\.resblocks\.(\d+)\.", k))}
    if not blocks or blocks != set(range(len(blocks))):
        raise ConversionError(f"visual.transformer.resblocks indices {sorted(blocks)} are not 0..n-1")
    mlp_width = source.shape("visual.transformer.resblocks.0.mlp.c_fc.weight")[0]
    if width % HEAD_WIDTH:
        raise ConversionError(f"vision width {width} is not a multiple of the head width {HEAD_WIDTH}")
    embed_dim = source.shape("visual.proj")[1]
    return ({"image_size": grid * patch, "layers": len(blocks), "width": width, "head_width": HEAD_WIDTH,
             "mlp_ratio": mlp_width / width, "patch_size": patch}, embed_dim)


def _text_files(text_encoder: Path, out: Path) -> dict:
    """Copies the BERT's config and tokenizer files into ``out``; returns its config dict."""
    config_path = text_encoder / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"--text-encoder {text_encoder}: no config.json; give the folder of the BERT text "
                              "encoder (e.g. microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract downloaded)")
    copied = [name for name in TEXT_FILES if (text_encoder / name).is_file()]
    if not {"vocab.txt", "tokenizer.json"} & set(copied):
        raise ConversionError(f"--text-encoder {text_encoder}: no tokenizer (vocab.txt or tokenizer.json)")
    for name in copied:
        shutil.copyfile(text_encoder / name, out / name)
    return json.loads(config_path.read_text())


def _expected_shapes(model_cfg: dict) -> dict[str, tuple[int, ...]]:
    """Parameter and buffer shapes of the upstream open_clip model, built on the meta device."""
    import open_clip

    build = json.loads(json.dumps(model_cfg))
    if "hf_model_name" in build["text_cfg"]:
        build["text_cfg"]["hf_model_pretrained"] = False
        cls = open_clip.CustomTextCLIP
    else:
        cls = open_clip.CLIP
    with torch.device("meta"):
        model = cls(**build)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def convert_unimed_clip(src: str | Path, out_dir: str | Path, *, text_encoder: str | Path | None = None,
                        context_length: int = 256) -> Path:
    """Converts a UniMed-CLIP ``.pt`` into an open_clip local-dir.

    Args:
        src: the released checkpoint (``unimed_clip_vit_b16.pt`` ...).
        out_dir: the folder to write (``open_clip_config.json``, ``open_clip_model.safetensors``,
            and the text encoder's config/tokenizer files when kept).
        text_encoder: folder of the BERT text encoder the release was trained with
            (config and tokenizer files); None exports the vision tower only.
        context_length: the text context (UniMed-CLIP's inference code uses 256).

    Returns:
        ``out_dir``; load it with ``load_teacher("local-dir:" + str(out_dir))``.

    Raises:
        ConversionError: unreadable file, unknown or missing tensors, shape mismatches.
    """
    source = TensorSource(src, strip_prefix="module.", unwrap="state_dict")
    vision_cfg, embed_dim = _vision_cfg(source)
    text_keys = [k for k in source.keys() if k.startswith("text_encoder.")]
    other = [k for k in source.keys() if not k.startswith(("visual.", "text_encoder.")) and k != "logit_scale"]
    if other:
        raise ConversionError(f"{src}: tensor(s) {other[:8]} belong to neither the vision tower, the text encoder "
                              "nor logit_scale; is this a UniMed-CLIP checkpoint?")
    keep_text = text_encoder is not None
    if keep_text and not text_keys:
        raise ConversionError(f"--text-encoder given but {src} holds no text_encoder.* tensors")

    with converted_dir(out_dir, KIND) as tmp:
        final = Path(out_dir).expanduser().resolve()
        if keep_text:
            bert = _text_files(Path(text_encoder).expanduser(), tmp)
            text_cfg = {"hf_model_name": str(final), "hf_tokenizer_name": str(final), "hf_proj_type": "mlp",
                        "hf_pooler_type": "cls_last_hidden_state_pooler",
                        "context_length": min(context_length, int(bert.get("max_position_embeddings", 512)))}
        else:
            text_cfg = dict(_PLACEHOLDER_TEXT)
        model_cfg = {"embed_dim": embed_dim, "quick_gelu": True, "vision_cfg": vision_cfg, "text_cfg": text_cfg}
        if keep_text:  # the meta build reads the copied BERT config from the temporary folder
            model_cfg_build = json.loads(json.dumps(model_cfg))
            model_cfg_build["text_cfg"]["hf_model_name"] = str(tmp)
            expected = _expected_shapes(model_cfg_build)
        else:
            expected = _expected_shapes(model_cfg)

        tensors: dict[str, torch.Tensor] = {}
        for key in source.keys():
            if key.startswith("visual.") or key == "logit_scale":
                tensors[key] = source.take(key)
            elif _BERT_BUFFERS.match(key) and f"text.{key[len('text_encoder.'):]}" not in expected:
                source.drop(key)  # a buffer transformers 5 recomputes
            elif key.startswith("text_encoder."):
                if keep_text:
                    tensors["text." + key[len("text_encoder."):]] = source.take(key)
                else:
                    source.drop(key)
        source.finish()
        if not keep_text:
            # Zeros for the placeholder text tower: it is never used (the config marks it absent).
            tensors.update({k: torch.zeros(shape) for k, shape in expected.items()
                            if not k.startswith("visual.") and k not in tensors})
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        wrong = sorted(k for k in set(tensors) & set(expected) if tuple(tensors[k].shape) != expected[k])
        if missing or unexpected or wrong:
            raise ConversionError(
                f"{src} does not fit open_clip's {'CustomTextCLIP' if keep_text else 'CLIP'} with the inferred config "
                f"{vision_cfg}: missing {missing[:6]}, unexpected {unexpected[:6]}, wrong shapes "
                f"{[(k, tuple(tensors[k].shape), expected[k]) for k in wrong[:4]]}")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "open_clip_model.safetensors"))
        config = {
            "model_cfg": model_cfg,
            "preprocess_cfg": {"mean": OPENAI_MEAN, "std": OPENAI_STD, "interpolation": "bicubic",
                               "resize_mode": "shortest"},
            "medalign": {"converted_from": Path(src).name, "text_tower": "present" if keep_text else "absent"},
        }
        (tmp / "open_clip_config.json").write_text(json.dumps(config, indent=2))
        write_marker(tmp, KIND, {"source": str(Path(src).expanduser().resolve()), "text_tower": keep_text,
                                 "tensors": len(tensors)})
    return Path(out_dir).expanduser().resolve()
