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
