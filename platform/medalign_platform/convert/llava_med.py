"""``medalign convert llava-med SRC OUT [VISION_TOWER]``: original-layout LLaVA-Med v1.5 to transformers.

``microsoft/llava-med-v1.5-mistral-7b`` is published in the layout of the original LLaVA
code (``model_type: llava_mistral``), which transformers refuses. What the original code
defines (LLaVA-Med's ``llava/model/llava_arch.py``, ``multimodal_projector/builder.py``,
``mm_utils.py``, ``conversation.py``), and what this converter turns it into:

=======================================  ===================================================
original                                 transformers ``LlavaForConditionalGeneration``
=======================================  ===================================================
``model.embed_tokens``, ``model.layers``,  ``language_model.model.*`` / ``language_model.lm_head``
``model.norm``, ``lm_head``              (rows for the new ``<image>`` token, padded to 64)
``model.mm_projector.0`` / ``.2``        ``multi_modal_projector.linear_1`` / ``linear_2``
(``mm_projector_type: mlp2x_gelu``)      (``projector_hidden_act: gelu``)
``model.vision_tower.vision_tower.*``    ``vision_tower.*`` -- or, when the shards lack it, the
or the CLIP named by ``mm_vision_tower``  ``vision_model.*`` of VISION_TOWER (a CLIP folder)
``mm_vision_select_layer: -2``           ``vision_feature_layer: -2``
``mm_vision_select_feature: patch``      ``vision_feature_select_strategy: default`` (CLS dropped)
``image_aspect_ratio: pad``              ``LlavaImageProcessor(do_pad=True)``: pad to a square
                                         with the mean colour, centred, then resize/crop
``conv_mistral_instruct``                chat template ``[INST] <image>\\n{q} [/INST]``
=======================================  ===================================================

Every source tensor is taken exactly once (rotary ``inv_freq`` buffers of old checkpoints
are dropped on purpose); a leftover or missing key is an error naming it, raised before a
byte is written. Shards are read one tensor at a time (``safe_open``) and written in
shards of at most ``max_shard_bytes``, so peak memory is about one output shard, not the
model; ``.bin`` shards are read with ``weights_only=True``. The output loads with
:func:`medalign_platform.core.student.load_student` (or any transformers >= 4.45).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..data.prompts import CHAT_TEMPLATES
from .sources import ConversionError, TensorSource, converted_dir, write_marker

__all__ = ["convert_llava_med", "plan_llava_med"]

KIND = "llava-med"
IMAGE_TOKEN = "<image>"
PAD_MULTIPLE = 64  # embedding rows padded for GPU efficiency, as transformers' own LLaVA converter does
TEXT_MODEL_TYPES = {"llava_mistral": "mistral", "llava_llama": "llama", "llava": "llama"}
# Config keys of the original LLaVA code that describe the vision side, not the LLM.
_LLAVA_KEYS = re.compile(r"^(mm_|tune_mm|freeze_mm|unfreeze_mm|use_mm_proj|image_aspect_ratio|image_grid_pinpoints|"
                         r"tokenizer_model_max_length|tokenizer_padding_side|feature_outs|img_size|vision_backbone|"
                         r"segtok_posembed|vision_tower_config|_name_or_path|architectures|model_type|torch_dtype|"
                         r"transformers_version)")
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ConversionError(f"{path.parent}: no {path.name}; {what}")
    return json.loads(path.read_text())


def _check_llava_config(config: dict, src: Path) -> None:
    model_type = config.get("model_type")
    if model_type not in TEXT_MODEL_TYPES:
        raise ConversionError(f"{src}/config.json has model_type={model_type!r}; expected an original-layout LLaVA "
                              f"checkpoint ({sorted(TEXT_MODEL_TYPES)}). A llava-hf folder needs no conversion.")
    projector = config.get("mm_projector_type", "linear")
    if projector != "mlp2x_gelu":
        raise ConversionError(f"mm_projector_type={projector!r}: transformers' LLaVA projector is linear-GELU-linear "
                              "(mlp2x_gelu) only")
    for key in ("mm_use_im_start_end", "mm_use_im_patch_token"):
        if config.get(key):
            raise ConversionError(f"{key}=true: checkpoints with <im_start>/<im_patch> tokens are not supported "
                                  "(LLaVA-Med v1.5 has both false)")
    if config.get("mm_patch_merge_type", "flat") != "flat":
        raise ConversionError(f"mm_patch_merge_type={config['mm_patch_merge_type']!r}: only flat (LLaVA-1.5) is "
                              "supported, not LLaVA-NeXT's anyres")
    if config.get("image_aspect_ratio", "square") not in ("pad", "square", None):
        raise ConversionError(f"image_aspect_ratio={config['image_aspect_ratio']!r}: only pad and square are supported")
    if config.get("mm_vision_select_feature", "patch") not in ("patch", "cls_patch"):
        raise ConversionError(f"mm_vision_select_feature={config['mm_vision_select_feature']!r}: patch or cls_patch")


def _vision_config(vision_dir: Path) -> dict:
    """CLIP vision config from a CLIPModel (``vision_config``) or CLIPVisionModel folder."""
    config = _read_json(vision_dir / "config.json", "VISION_TOWER must be a CLIP folder "
                        "(e.g. openai/clip-vit-large-patch14-336 downloaded)")
    if config.get("model_type") == "clip":
        return dict(config["vision_config"])
    if config.get("model_type") == "clip_vision_model":
        return {k: v for k, v in config.items() if k not in ("architectures", "transformers_version", "torch_dtype")}
    raise ConversionError(f"{vision_dir}/config.json has model_type={config.get('model_type')!r}; the LLaVA-Med vision "
                          "tower is a CLIP (clip or clip_vision_model)")


def _resolve_vision_dir(config: dict, vision_tower: str | Path | None) -> Path:
    named = config.get("mm_vision_tower")
    candidate = Path(vision_tower).expanduser() if vision_tower else (Path(named).expanduser() if named else None)
    if candidate is None or not candidate.is_dir():
        raise ConversionError(
            f"the vision tower {named!r} (mm_vision_tower) is not a local folder; download it (huggingface-cli "
            f"download {named} --local-dir DIR) and pass DIR: medalign convert llava-med SRC OUT DIR")
    return candidate


def _image_processor(vision_dir: Path, pad: bool, vision: dict):
    from transformers import LlavaImageProcessor

    path = vision_dir / "preprocessor_config.json"
    clip = json.loads(path.read_text()) if path.is_file() else {}
    size = int(vision["image_size"])
    kwargs = {
        "size": clip.get("size", {"shortest_edge": size}),
        "crop_size": clip.get("crop_size", {"height": size, "width": size}),
        "resample": clip.get("resample", 3),  # bicubic
        "do_center_crop": clip.get("do_center_crop", True),
        "image_mean": clip.get("image_mean", [0.48145466, 0.4578275, 0.40821073]),
        "image_std": clip.get("image_std", [0.26862954, 0.26130258, 0.27577711]),
        "do_convert_rgb": True,
        # LLaVA's expand2square: paste centred on a square of the mean colour (int(255 * mean)).
        "do_pad": pad,
    }
    if isinstance(kwargs["size"], int):
        kwargs["size"] = {"shortest_edge": kwargs["size"]}
    if isinstance(kwargs["crop_size"], int):
        kwargs["crop_size"] = {"height": kwargs["crop_size"], "width": kwargs["crop_size"]}
    return LlavaImageProcessor(**kwargs)


def _tokenizer(src: Path):
    from transformers import AddedToken, AutoTokenizer

    if not any((src / name).is_file() for name in ("tokenizer.model", "tokenizer.json")):
        raise ConversionError(f"{src}: no tokenizer.model or tokenizer.json; the release's tokenizer files must be "
                              "in SRC")
    tokenizer = AutoTokenizer.from_pretrained(src)
    if IMAGE_TOKEN in tokenizer.get_vocab():
        raise ConversionError(f"{src}: the tokenizer already has {IMAGE_TOKEN}; is it already converted?")
    tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    if tokenizer.pad_token is None:  # LLaVA v1 training pads with <unk>; keep that when it is set
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def _text_key(key: str) -> str | None:
    """Original LLM key -> transformers Llava key (None for keys that are not the LLM's)."""
    if key == "lm_head.weight":
        return "language_model.lm_head.weight"
    if key.startswith(("model.embed_tokens.", "model.layers.", "model.norm.")):
        return "language_model." + key
    return None


def plan_llava_med(src: str | Path, vision_tower: str | Path | None = None) -> dict:
    """Reads configs and tensor headers (no weights) and returns the conversion plan.

    Returns:
        ``config`` (the transformers LlavaConfig), ``tokenizer``, ``image_processor``,
        ``mapping`` (output key -> (source name, source key) or a resize instruction),
        ``dtype``, ``vision_from`` ("checkpoint" or the vision folder).
    """
    from transformers import CLIPVisionConfig, LlavaConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    src = Path(src).expanduser()
    config = _read_json(src / "config.json", "SRC must be the LLaVA-Med release folder")
    _check_llava_config(config, src)
    source = TensorSource(src)
    llava_vision = "model.vision_tower.vision_tower."
    has_vision = any(k.startswith(llava_vision) for k in source.keys())
    vision_dir = _resolve_vision_dir(config, vision_tower)
    vision = _vision_config(vision_dir)
    if int(config.get("mm_hidden_size", vision["hidden_size"])) != int(vision["hidden_size"]):
        raise ConversionError(f"mm_hidden_size={config['mm_hidden_size']} but the vision tower in {vision_dir} has "
                              f"hidden_size={vision['hidden_size']}: wrong VISION_TOWER")
    tokenizer = _tokenizer(src)
    vocab = int(config["vocab_size"])
    new_vocab = -(-len(tokenizer) // PAD_MULTIPLE) * PAD_MULTIPLE
    dtype = _DTYPES.get(str(config.get("torch_dtype", "float16")), torch.float16)

    text_fields = {k: v for k, v in config.items() if not _LLAVA_KEYS.match(k)}
    text_config = CONFIG_MAPPING[TEXT_MODEL_TYPES[config["model_type"]]](**{**text_fields, "vocab_size": new_vocab})
    select = config.get("mm_vision_select_feature", "patch")
    image_size, patch = int(vision["image_size"]), int(vision["patch_size"])
    llava_config = LlavaConfig(
        vision_config=CLIPVisionConfig(**vision),
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=int(config.get("mm_vision_select_layer", -2)),
        vision_feature_select_strategy="default" if select == "patch" else "full",
        projector_hidden_act="gelu",
        image_seq_length=(image_size // patch) ** 2 + (0 if select == "patch" else 1),
        multimodal_projector_bias=True,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
    )
    llava_config.dtype = dtype

    mapping: dict[str, tuple] = {}
    dropped: list[str] = []
    for key in source.keys():
        if key.endswith("rotary_emb.inv_freq") or key == "model.image_newline":
            dropped.append(key)  # recomputed buffers / unused with flat merging
            continue
        text_key = _text_key(key)
        if text_key is not None:
            resize = key in ("model.embed_tokens.weight", "lm_head.weight")
            mapping[text_key] = ("src", key, "resize" if resize else None)
        elif key.startswith("model.mm_projector."):
            index, rest = key[len("model.mm_projector."):].split(".", 1)
            layer = {"0": "linear_1", "2": "linear_2"}.get(index)
            if layer is None:
                continue  # left untaken: reported as an unknown key below
            mapping[f"multi_modal_projector.{layer}.{rest}"] = ("src", key, None)
        elif key.startswith(llava_vision):
            rest = key[len(llava_vision):]  # CLIPVisionModel keys; released checkpoints carry vision_model.
            mapping["vision_tower." + (rest if rest.startswith("vision_model.") else "vision_model." + rest)] = (
                "src", key, None)
    vision_source = None
    if not has_vision:
        vision_source = TensorSource(vision_dir)
        for key in vision_source.keys():
            if key.startswith("vision_model."):
                mapping["vision_tower." + key] = ("vision", key, None)
    unknown = sorted(set(source.keys()) - {v[1] for v in mapping.values() if v[0] == "src"} - set(dropped))
    if unknown:
        shown = ", ".join(unknown[:12]) + (f" ... ({len(unknown)} in all)" if len(unknown) > 12 else "")
        raise ConversionError(f"{src}: {len(unknown)} source tensor(s) have no place in LlavaForConditionalGeneration: "
                              f"{shown}; nothing was written")
    _check_against_model(llava_config, mapping, source, vision_source, vocab, new_vocab)
    return {"config": llava_config, "tokenizer": tokenizer, "vision_dir": vision_dir, "source": source,
            "vision_source": vision_source, "mapping": mapping, "dropped": dropped, "dtype": dtype,
            "vocab": vocab, "new_vocab": new_vocab, "pad": config.get("image_aspect_ratio") == "pad",
            "vision": vision, "vision_from": "checkpoint" if has_vision else str(vision_dir)}


def _classic_key(key: str) -> str:
    """In-memory transformers 5 key -> the llava-hf checkpoint layout written here."""
    if key == "lm_head.weight":
        return "language_model.lm_head.weight"
    for prefix, classic in (("model.language_model.", "language_model.model."),
                            ("model.vision_tower.", "vision_tower.vision_model."),
                            ("model.multi_modal_projector.", "multi_modal_projector.")):
        if key.startswith(prefix):
            return classic + key[len(prefix):]
    return key


def _check_against_model(config, mapping: dict, source: TensorSource, vision_source: TensorSource | None,
                         vocab: int, new_vocab: int) -> None:
    """Every parameter of the meta-built model is planned with the right shape, and nothing else."""
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    expected = {_classic_key(k): tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("language_model.lm_head.weight", None)
    missing = sorted(set(expected) - set(mapping))
    extra = sorted(set(mapping) - set(expected))
    wrong = []
    for key in sorted(set(expected) & set(mapping)):
        origin, source_key, resize = mapping[key]
        shape = (source if origin == "src" else vision_source).shape(source_key)
        if resize:
            shape = (new_vocab, *shape[1:]) if shape[0] == vocab else ("vocab", shape[0], "!=", vocab)
        if tuple(shape) != expected[key]:
            wrong.append((source_key, shape, expected[key]))
    if missing or extra or wrong:
        raise ConversionError(f"the checkpoint does not fill LlavaForConditionalGeneration: missing {missing[:8]}, "
                              f"unplaced {extra[:8]}, wrong shapes {wrong[:4]}; nothing was written")


def _resized(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """Embedding / lm_head rows for the new tokens: the mean of the existing rows (deterministic;
    the image token's input row is never used, since image features replace it)."""
    extra = tensor.float().mean(dim=0, keepdim=True).to(tensor.dtype).expand(rows - tensor.shape[0], -1)
    return torch.cat([tensor, extra], dim=0)


def _shard_plan(plan: dict, max_shard_bytes: int) -> list[list[str]]:
    """Output keys grouped into shards by size, from shapes only (nothing read yet)."""
    itemsize = torch.tensor([], dtype=plan["dtype"]).element_size()
    shards, current, size = [], [], 0
    for key in sorted(plan["mapping"]):
        origin, source_key, resize = plan["mapping"][key]
        shape = (plan["source"] if origin == "src" else plan["vision_source"]).shape(source_key)
        numel = plan["new_vocab"] * shape[1] if resize else int(torch.Size(shape).numel())
        nbytes = numel * itemsize
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(key)
        size += nbytes
    if current:
        shards.append(current)
    return shards


def convert_llava_med(src: str | Path, out_dir: str | Path, vision_tower: str | Path | None = None, *,
                      max_shard_bytes: int = 5 * 2**30) -> Path:
    """Converts an original-layout LLaVA-Med (``llava_mistral``) folder to a transformers LLaVA folder.

    Args:
        src: the release folder (``config.json``, ``model-*.safetensors`` + index, tokenizer files).
        out_dir: where to write the converted model, tokenizer and processor.
        vision_tower: the CLIP folder named by ``mm_vision_tower``
            (``openai/clip-vit-large-patch14-336`` downloaded); used for its config and
            preprocessing, and for its weights when the checkpoint does not carry them.
            Default: ``mm_vision_tower`` itself when it is a local folder.
        max_shard_bytes: the largest output shard (peak memory is about one shard).

    Returns:
        ``out_dir``, ready for ``load_student(out_dir)``.

    Raises:
        ConversionError: naming the config key, file or tensor that prevents the conversion.
    """
    from transformers import LlavaProcessor

    src = Path(src).expanduser()
    plan = plan_llava_med(src, vision_tower)
    source, vision_source, dtype = plan["source"], plan["vision_source"], plan["dtype"]
    shards = _shard_plan(plan, max_shard_bytes)
    with converted_dir(out_dir, KIND) as tmp:
        weight_map, total = {}, 0
        for number, keys in enumerate(shards, start=1):
            name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for key in keys:
                origin, source_key, resize = plan["mapping"][key]
                tensor = (source if origin == "src" else vision_source).take(source_key).to(dtype)
                if resize:
                    tensor = _resized(tensor, plan["new_vocab"])
                tensors[key] = tensor.contiguous()
                total += tensor.numel() * tensor.element_size()
                weight_map[key] = name
            save_file(tensors, str(tmp / name), metadata={"format": "pt"})
            del tensors
        for key in plan["dropped"]:
            source.drop(key)
        source.finish()
        if vision_source is not None:
            for key in vision_source.untaken():  # CLIPModel's text tower and projections: not part of LLaVA
                if not key.startswith("vision_model."):
                    vision_source.drop(key)
            vision_source.finish()
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))

        config = plan["config"]
        config.save_pretrained(tmp)
        generation = src / "generation_config.json"
        if generation.is_file():
            shutil.copyfile(generation, tmp / "generation_config.json")
        vision = plan["vision"]
        processor = LlavaProcessor(
            image_processor=_image_processor(plan["vision_dir"], plan["pad"], vision),
            tokenizer=plan["tokenizer"],
            patch_size=int(vision["patch_size"]),
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
            chat_template=CHAT_TEMPLATES["mistral_instruct" if "mistral" in config.text_config.model_type
                                         else "llava_v1"],
        )
        processor.save_pretrained(tmp)
        write_marker(tmp, KIND, {"source": str(src.resolve()), "vision_tower_weights": plan["vision_from"],
                                 "dropped": plan["dropped"], "vocab": [plan["vocab"], plan["new_vocab"]],
                                 "image_token_id": config.image_token_id})
    return Path(out_dir).expanduser().resolve()
