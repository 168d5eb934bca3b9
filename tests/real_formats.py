"""Tiny checkpoints written in the exact on-disk formats of the real releases (no download).

Each builder writes what the public release ships, with small random weights:

* :func:`tiny_bert` -- a BERT text encoder folder (``config.json`` + WordPiece ``vocab.txt``),
  the shape of BiomedBERT / PubMedBERT;
* :func:`tiny_biomedclip` -- an open_clip local-dir with BiomedCLIP's config schema (timm
  ``vit_*_patch16_224`` vision tower, Hugging Face BERT text tower with an MLP projection
  and CLS pooling, OpenAI mean/std), tokenizer files inside the folder as open_clip expects;
* :func:`tiny_pubmedclip` -- a transformers ``CLIPModel`` folder with a CLIP BPE tokenizer
  (``vocab.json`` + ``merges.txt``) and ``preprocessor_config.json``, 224 px / patch 32;
* :func:`tiny_unimed_pt` -- a UniMed-CLIP ``.pt``: the fork's key layout (``visual.*`` of
  an open_clip-style ViT, ``text_encoder.transformer.*`` / ``text_encoder.proj.*``,
  ``logit_scale``) under ``state_dict`` with DDP's ``module.`` prefix;
* :func:`tiny_llava_med` -- an original-layout LLaVA-Med v1.5 folder (``llava_mistral``
  config with the ``mm_*`` keys, sharded safetensors + index json, tokenizer) plus a CLIP
  vision-tower folder in ``openai/clip-vit-large-patch14-336``'s layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
WORDS = ("the a an is there lesion lesions in on of left right lung chest x ray xray brain mri ct scan "
         "fracture organ shown what where which how many yes no mass nodule normal abnormal liver heart "
         "kidney image this describe finding findings upper lower").split()


# --------------------------------------------------------------------------- text towers


def tiny_bert(out_dir: Path, *, hidden: int = 32, layers: int = 2, max_positions: int = 64, seed: int = 0) -> Path:
    """A BERT folder as on the hub: ``config.json``, ``vocab.txt``, tokenizer config."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *"0123456789.,?!-'"]
    (out_dir / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(out_dir / "vocab.txt"), do_lower_case=True).save_pretrained(out_dir)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=max_positions, pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        BertModel(config, add_pooling_layer=False).save_pretrained(out_dir)
    return out_dir


# --------------------------------------------------------------------------- teachers


def tiny_biomedclip(out_dir: Path, *, timm_model_name: str = "vit_tiny_patch16_224", embed_dim: int = 32,
                    context_length: int = 32, seed: int = 0) -> Path:
    """An open_clip local-dir with BiomedCLIP's ``open_clip_config.json`` schema.

    The text tower is a tiny BERT stored in the same folder (``config.json`` + tokenizer
    files): ``hf_model_name`` points at the folder (the hub release names
    ``microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract`` there), and open_clip reads a
    local-dir's tokenizer from the folder itself.
    """
    import open_clip

    out_dir = Path(out_dir).resolve()
    tiny_bert(out_dir, seed=seed)
    model_cfg = {
        "embed_dim": embed_dim,
        "vision_cfg": {"timm_model_name": timm_model_name, "timm_model_pretrained": False, "timm_pool": "",
                       "timm_proj": "linear", "image_size": 224},
        "text_cfg": {"hf_model_name": str(out_dir), "hf_tokenizer_name": str(out_dir), "hf_proj_type": "mlp",
                     "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": context_length},
    }
    (out_dir / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": model_cfg, "preprocess_cfg": {"mean": CLIP_MEAN, "std": CLIP_STD}}, indent=2))
    build_cfg = json.loads(json.dumps(model_cfg))
    build_cfg["text_cfg"]["hf_model_pretrained"] = False
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CustomTextCLIP(**build_cfg)
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
              str(out_dir / "open_clip_model.safetensors"))
    return out_dir


def _clip_bpe_files(out_dir: Path) -> int:
    """CLIP's tokenizer files (byte-level BPE with ``</w>``), a handful of merges; returns vocab size."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": len(alphabet) + i for i, c in enumerate(alphabet)})
    merges = ["t h", "th e</w>", "l u", "lu n", "lun g</w>", "l e", "le s", "les i", "lesi o", "lesio n</w>"]
    for merge in merges:
        vocab["".join(merge.split())] = len(vocab)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    (out_dir / "vocab.json").write_text(json.dumps(vocab))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))
    return len(vocab)


def tiny_pubmedclip(out_dir: Path, *, image_size: int = 224, patch_size: int = 32, seed: int = 0) -> Path:
    """A transformers ``CLIPModel`` folder in PubMedCLIP's layout (224 px, patch 32 -> 7x7)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_size = _clip_bpe_files(out_dir)
    config = CLIPConfig(
        text_config={"vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 32, "bos_token_id": vocab_size - 2,
                     "eos_token_id": vocab_size - 1, "pad_token_id": vocab_size - 1},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": image_size, "patch_size": patch_size},
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        CLIPModel(config).save_pretrained(out_dir)
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                       image_mean=CLIP_MEAN, image_std=CLIP_STD).save_pretrained(out_dir)
    return out_dir


def unimed_vision_state(*, width: int = 128, layers: int = 2, patch: int = 16, image_size: int = 64,
                        embed_dim: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the UniMed-CLIP fork's ``VisualTransformer`` key names."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.05):
        return torch.randn(*shape, generator=generator) * scale

    grid = image_size // patch
    state = {
        "visual.conv1.weight": rand(width, 3, patch, patch),
        "visual.class_embedding": rand(width),
        "visual.positional_embedding": rand(grid * grid + 1, width),
        "visual.ln_pre.weight": 1 + rand(width), "visual.ln_pre.bias": rand(width),
        "visual.ln_post.weight": 1 + rand(width), "visual.ln_post.bias": rand(width),
        "visual.proj": rand(width, embed_dim),
    }
    for i in range(layers):
        block = f"visual.transformer.resblocks.{i}."
        state.update({
            block + "attn.in_proj_weight": rand(3 * width, width, scale=0.08), block + "attn.in_proj_bias": rand(3 * width),
            block + "attn.out_proj.weight": rand(width, width, scale=0.08), block + "attn.out_proj.bias": rand(width),
            block + "ln_1.weight": 1 + rand(width), block + "ln_1.bias": rand(width),
            block + "ln_2.weight": 1 + rand(width), block + "ln_2.bias": rand(width),
            block + "mlp.c_fc.weight": rand(4 * width, width, scale=0.08), block + "mlp.c_fc.bias": rand(4 * width),
            block + "mlp.c_proj.weight": rand(width, 4 * width, scale=0.08), block + "mlp.c_proj.bias": rand(width),
        })
    return state


def tiny_unimed_pt(path: Path, *, bert_dir: Path | None = None, embed_dim: int = 32, seed: int = 0,
                   extra: dict | None = None) -> Path:
    """A UniMed-CLIP checkpoint file: ``{"state_dict": {"module.<key>": tensor}, "epoch": int}``.

    With ``bert_dir`` (a :func:`tiny_bert` folder) the fork's text encoder is included:
    ``text_encoder.transformer.*`` (BERT without pooler) and ``text_encoder.proj.{0,2}.weight``
    (MLP projection, no bias).
    """
    state = unimed_vision_state(embed_dim=embed_dim, seed=seed)
    state["logit_scale"] = torch.tensor(4.6052)
    if bert_dir is not None:
        from transformers import BertModel

        bert = BertModel.from_pretrained(bert_dir, add_pooling_layer=False)
        for key, value in bert.state_dict().items():
            state[f"text_encoder.transformer.{key}"] = value.clone()
        hidden = bert.config.hidden_size
        generator = torch.Generator().manual_seed(seed + 1)
        state["text_encoder.proj.0.weight"] = torch.randn((hidden + embed_dim) // 2, hidden, generator=generator) * 0.1
        state["text_encoder.proj.2.weight"] = torch.randn(embed_dim, (hidden + embed_dim) // 2, generator=generator) * 0.1
    state.update(extra or {})
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 10}, path)
    return Path(path)


# --------------------------------------------------------------------------- students

LLAVA_MED_TOKENIZER_CONFIG = {  # what LLaVA's training saved (slow LlamaTokenizer, pad = unk)
    "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>",
    "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>", "model_max_length": 2048,
    "padding_side": "right", "legacy": False, "clean_up_tokenization_spaces": False,
}


def sentencepiece_tokenizer(out_dir: Path, vocab_size: int = 420) -> int:
    """A real sentencepiece BPE ``tokenizer.model`` (byte fallback, <unk>/<s>/</s> = 0/1/2, as
    Mistral's), trained on a few medical VQA phrases; returns its vocabulary size."""
    import io

    import sentencepiece as spm

    corpus = [" ".join(WORDS[i:i + 7]) for i in range(len(WORDS))] * 8 + ["[INST] [/INST] describe the findings ."] * 8
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2)
    (out_dir / "tokenizer.model").write_bytes(model.getvalue())
    (out_dir / "tokenizer_config.json").write_text(json.dumps(LLAVA_MED_TOKENIZER_CONFIG, indent=2))
    (out_dir / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}))
    return vocab_size


def tiny_clip_vision_tower(out_dir: Path, *, image_size: int = 32, patch_size: int = 8, hidden: int = 32,
                           seed: int = 0) -> Path:
    """A CLIP folder in ``openai/clip-vit-large-patch14-336``'s layout (a full ``CLIPModel``,
    text tower included, and ``preprocessor_config.json``)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = CLIPConfig(
        text_config={"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 16, "bos_token_id": 62,
                     "eos_token_id": 63, "pad_token_id": 63},
        vision_config={"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": 3,
                       "num_attention_heads": 2, "image_size": image_size, "patch_size": patch_size},
        projection_dim=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        CLIPModel(config).save_pretrained(out_dir)
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                       image_mean=CLIP_MEAN, image_std=CLIP_STD, resample=3).save_pretrained(out_dir)
    return out_dir


def llava_med_config(vocab_size: int, vision_tower: str, *, hidden: int = 64, layers: int = 4, mm_hidden: int = 32,
                     sliding_window: int | None = None) -> dict:
    """``config.json`` of microsoft/llava-med-v1.5-mistral-7b, every key as released, at tiny sizes."""
    return {
        "_name_or_path": "llava-med-v1.5-mistral-7b", "architectures": ["LlavaMistralForCausalLM"],
        "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2, "feature_outs": "encoder+decoder",
        "freeze_mm_mlp_adapter": False, "hidden_act": "silu", "hidden_size": hidden, "image_aspect_ratio": "pad",
        "img_size": 640, "initializer_range": 0.02, "intermediate_size": 2 * hidden, "max_position_embeddings": 512,
        "mm_hidden_size": mm_hidden, "mm_patch_merge_type": "flat", "mm_projector_lr": None,
        "mm_projector_type": "mlp2x_gelu", "mm_resampler_type": None, "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False, "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
        "mm_vision_tower": vision_tower, "model_type": "llava_mistral", "num_attention_heads": 4,
        "num_hidden_layers": layers, "num_key_value_heads": 2, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
        "segtok_posembed": "cosine", "sliding_window": sliding_window, "tie_word_embeddings": False,
        "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right", "torch_dtype": "float16",
        "transformers_version": "4.36.2", "tune_mm_mlp_adapter": False, "tune_mm_vision_resampler": False,
        "unfreeze_mm_vision_tower": False, "use_cache": False, "use_mm_proj": True,
        "vision_backbone": "convnext-large", "vision_tower_config": None, "vocab_size": vocab_size,
    }


def tiny_llava_med(root: Path, *, with_vision_weights: bool = False, weights: str = "safetensors",
                   extra: dict | None = None, drop: tuple[str, ...] = (), seed: int = 0) -> tuple[Path, Path]:
    """An original-layout LLaVA-Med v1.5 folder and its CLIP vision-tower folder.

    The LLM is a tiny Mistral (grouped-query attention) whose ``model.*`` / ``lm_head`` keys
    are the release's; ``model.mm_projector.{0,2}`` is the mlp2x_gelu projector;
    ``with_vision_weights`` also stores ``model.vision_tower.vision_tower.vision_model.*``.
    Weights are fp16 (``torch_dtype: float16``) in two shards with an index json
    (``weights="bin"``: ``pytorch_model-*.bin`` shards). ``extra`` adds tensors, ``drop``
    removes keys (for error tests).

    Returns:
        ``(src_dir, vision_tower_dir)``.
    """
    from transformers import MistralConfig, MistralForCausalLM

    from medalign_platform.convert.sources import TensorSource

    root = Path(root)
    vision_dir = tiny_clip_vision_tower(root / "clip-vit-tiny", seed=seed)
    src = root / "llava-med-tiny"
    src.mkdir(parents=True, exist_ok=True)
    vocab = sentencepiece_tokenizer(src)
    config = llava_med_config(vocab, str(vision_dir))
    (src / "config.json").write_text(json.dumps(config, indent=2))
    (src / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    text_config = MistralConfig(**{k: v for k, v in config.items() if not k.startswith(("mm_", "architectures"))
                                   and k not in ("model_type", "_name_or_path")})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        llm = MistralForCausalLM(text_config)
        state = {k: v.detach().clone() for k, v in llm.state_dict().items()}
        hidden, mm_hidden = config["hidden_size"], config["mm_hidden_size"]
        state["model.mm_projector.0.weight"] = torch.randn(hidden, mm_hidden) * 0.1
        state["model.mm_projector.0.bias"] = torch.randn(hidden) * 0.1
        state["model.mm_projector.2.weight"] = torch.randn(hidden, hidden) * 0.1
        state["model.mm_projector.2.bias"] = torch.randn(hidden) * 0.1
    if with_vision_weights:
        clip = TensorSource(vision_dir)  # the released key names: vision_model.*
        state.update({f"model.vision_tower.vision_tower.{k}": clip.take(k).clone() for k in clip.keys()
                      if k.startswith("vision_model.")})
    state.update(extra or {})
    for key in drop:
        del state[key]
    state = {k: v.to(torch.float16).contiguous() for k, v in state.items()}
    keys = sorted(state)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    suffix = "safetensors" if weights == "safetensors" else "bin"
    stem = "model" if weights == "safetensors" else "pytorch_model"
    weight_map = {}
    for number, part in enumerate(halves, start=1):
        name = f"{stem}-{number:05d}-of-00002.{suffix}"
        if weights == "safetensors":
            save_file({k: state[k] for k in part}, str(src / name), metadata={"format": "pt"})
        else:
            torch.save({k: state[k] for k in part}, src / name)
        weight_map.update({k: name for k in part})
    index = "model.safetensors.index.json" if weights == "safetensors" else "pytorch_model.bin.index.json"
    (src / index).write_text(json.dumps({"metadata": {"total_size": sum(v.numel() * 2 for v in state.values())},
                                         "weight_map": weight_map}, indent=2))
    return src, vision_dir


def _byte_level_bpe(out_dir: Path, specials: list[str]):
    """A Qwen-style byte-level BPE tokenizer (no BOS) trained on the vocabulary words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    core.train_from_iterator([" ".join(WORDS[i:i + 6]) for i in range(len(WORDS))] * 4 + ["?", "."], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token=None, additional_special_tokens=["<|im_start|>", "<image>"])


def tiny_family_student(out_dir: Path, family: str, *, sliding_window: int = 8, seed: int = 0) -> Path:
    """A tiny random LLaVA-class student of one LLM family, saved with its processor.

    * ``llama``: CLIP vision tower + Llama, sentencepiece tokenizer, llava-1.5's USER/ASSISTANT
      chat template (what ``llava-hf/llava-1.5-7b-hf`` ships);
    * ``mistral``: CLIP + Mistral with a short ``sliding_window`` on every layer, the Mistral
      instruction template (a converted LLaVA-Med);
    * ``qwen2``: SigLIP (no CLS, ``full`` features, last layer) + Qwen2 with a sliding window on the last
      layer (full attention before it) and q/k/v biases, byte-level BPE and ChatML (``llava-interleave-qwen``).
    """
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        MistralConfig,
        Qwen2Config,
        SiglipImageProcessor,
        SiglipVisionConfig,
        AddedToken,
        AutoTokenizer,
    )

    from medalign_platform.data.prompts import CHAT_TEMPLATES

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    size, patch = 32, 8
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)
    if family in ("llama", "mistral"):
        spm_dir = out_dir / "spm"
        spm_dir.mkdir(exist_ok=True)
        sentencepiece_tokenizer(spm_dir)
        tokenizer = AutoTokenizer.from_pretrained(spm_dir)
        tokenizer.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=size, patch_size=patch)
        image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        strategy, layer, extra_tokens = "default", -2, 1
        if family == "llama":
            text = LlamaConfig(vocab_size=len(tokenizer), **common)
            template = CHAT_TEMPLATES["llava_v1"]
        else:
            text = MistralConfig(vocab_size=len(tokenizer), sliding_window=sliding_window, **common)
            template = CHAT_TEMPLATES["mistral_instruct"]
        text.bos_token_id, text.eos_token_id, text.pad_token_id = 1, 2, 0
    elif family == "qwen2":
        tokenizer = _byte_level_bpe(out_dir, ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"])
        vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                    image_size=size, patch_size=patch)
        image_processor = SiglipImageProcessor(size={"height": size, "width": size})
        strategy, layer, extra_tokens = "full", -1, 0
        text = Qwen2Config(vocab_size=len(tokenizer), use_sliding_window=True, sliding_window=sliding_window,
                           max_window_layers=2, **common)
        text.eos_token_id = tokenizer.eos_token_id
        text.pad_token_id = tokenizer.pad_token_id
        template = CHAT_TEMPLATES["qwen_chatml"]
    else:
        raise ValueError(family)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_id, vision_feature_layer=layer,
                         vision_feature_select_strategy=strategy, image_seq_length=(size // patch) ** 2,
                         pad_token_id=text.pad_token_id, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        LlavaForConditionalGeneration(config).save_pretrained(out_dir)
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
                   vision_feature_select_strategy=strategy, num_additional_image_tokens=extra_tokens,
                   chat_template=template).save_pretrained(out_dir)
    return out_dir
