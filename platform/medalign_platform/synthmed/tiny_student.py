"""A tiny random LLaVA student with a locally built tokenizer and processor.

Nothing is downloaded: the word-level tokenizer is built with the ``tokenizers`` library,
the image processor is a plain ``CLIPImageProcessor``, and the model is a
``LlavaForConditionalGeneration`` with small CLIP-vision and Llama configs. It is saved with
``save_pretrained`` and meant to be loaded back with :func:`medalign_platform.core.student.load_student`,
the same path as a real checkpoint such as LLaVA-Med.
"""

from __future__ import annotations

from pathlib import Path

import torch

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")

# Enough words for prompts, questions and short reports about (synthetic) scans.
DEFAULT_WORDS = """
user assistant question answer describe the image scan is there a an any no yes lesion lesions
mass nodule opacity finding findings normal abnormal left right upper lower top bottom center central
quadrant side where what which how many one two three zero none round oval elongated irregular
small medium large bright dark faint size shape count located in on of at and with without
visible seen shows show this study chest xray ct mri unremarkable present absent single multiple
""".split()

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% else %}{{ part['text'] }} {% endif %}"
    "{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_tokenizer(words: list[str] | None = None):
    """Word-level fast tokenizer over ``words`` plus digits, punctuation and special tokens."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocabulary = list(SPECIAL_TOKENS)
    extra = list(words or DEFAULT_WORDS) + list("0123456789.,?!:;-()/'\"")
    for word in extra:
        if word not in vocabulary:
            vocabulary.append(word)
    core = Tokenizer(WordLevel({w: i for i, w in enumerate(vocabulary)}, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()  # special tokens such as <image> are matched before this
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(), pre_tokenizers.Digits(individual_digits=True)]
    )
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    bos = vocabulary.index("<s>")
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<image>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_student(
    out_dir: str | Path,
    *,
    words: list[str] | None = None,
    image_size: int = 32,
    patch_size: int = 4,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vision_hidden_size: int = 32,
    vision_layers: int = 2,
    vision_feature_layer: int = -2,
    seed: int = 0,
) -> Path:
    """Builds, saves and returns the directory of a tiny random LLaVA student.

    The defaults give an 8x8 visual grid (64 image tokens), a 4-layer Llama with
    grouped-query attention (4 query heads, 2 key/value heads) and ~0.2M parameters.

    Args:
        out_dir: where ``save_pretrained`` writes model, tokenizer and processor.
        words: tokenizer vocabulary (a default set of scan/VQA words if None).
        vision_feature_layer: the vision hidden state the projector reads (LLaVA-1.5: -2,
            the second to last; -1 uses every vision layer).
        seed: weights are a deterministic function of the seed.

    Returns:
        ``Path(out_dir)``.
    """
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    if image_size % patch_size:
        raise ValueError(f"image_size={image_size} must be a multiple of patch_size={patch_size}")
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(words)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    # LLaVA-1.5 layout: CLIP's CLS is dropped ("default"), so the processor inserts
    # (image_size / patch_size)^2 image tokens per <image>.
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    num_visual = (image_size // patch_size) ** 2
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=vision_hidden_size,
            intermediate_size=vision_hidden_size * 2,
            num_hidden_layers=vision_layers,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=patch_size,
            projection_dim=vision_hidden_size,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 2,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            max_position_embeddings=1024,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=False,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="default",
        image_seq_length=num_visual,
        projector_hidden_act="gelu",
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
