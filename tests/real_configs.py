"""The configs of the real 7B (and 0.5B) students, with the values of their released config.json.

Written out here so that tests (and ``benchmarks/memory_probe.py``) can build the exact shapes
on the meta device without a download. Parameter counts as published on the model pages:
LLaVA-1.5-7B 7.06B (7,063,427,072), LLaVA-Med v1.5 7.57B (Mistral-7B 7,241,732,096 + CLIP
ViT-L/14-336 vision tower + projector), llava-interleave-qwen-0.5b 0.9B.
"""

from __future__ import annotations

# openai/clip-vit-large-patch14-336: the vision_config of its config.json (both 7B students use it).
CLIP_VIT_L_14_336 = {
    "hidden_size": 1024, "image_size": 336, "intermediate_size": 4096, "model_type": "clip_vision_model",
    "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-05,
}

# llava-hf/llava-1.5-7b-hf/config.json (text_config: Vicuna-7B v1.5 = Llama-2-7B shape).
LLAVA_15_7B_HF = {
    "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": 32000,
    "model_type": "llava", "pad_token_id": 32001, "projector_hidden_act": "gelu",
    "text_config": {
        "_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
        "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05, "torch_dtype": "float16",
        "vocab_size": 32064, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32,
    },
    "tie_word_embeddings": False, "torch_dtype": "float16",
    "vision_config": CLIP_VIT_L_14_336,
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064,
}
LLAVA_15_7B_PARAMS = 7_063_427_072

# microsoft/llava-med-v1.5-mistral-7b/config.json (the original LLaVA layout, llava_mistral).
LLAVA_MED_15_MISTRAL_7B = {
    "architectures": ["LlavaMistralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
    "feature_outs": "encoder+decoder", "freeze_mm_mlp_adapter": False, "hidden_act": "silu", "hidden_size": 4096,
    "image_aspect_ratio": "pad", "img_size": 640, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 32768, "mm_hidden_size": 1024, "mm_patch_merge_type": "flat", "mm_projector_lr": None,
    "mm_projector_type": "mlp2x_gelu", "mm_resampler_type": None, "mm_use_im_patch_token": False,
    "mm_use_im_start_end": False, "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
    "mm_vision_tower": "openai/clip-vit-large-patch14-336", "model_type": "llava_mistral", "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
    "segtok_posembed": "cosine", "sliding_window": None, "tie_word_embeddings": False,
    "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right", "torch_dtype": "float16",
    "transformers_version": "4.36.2", "tune_mm_mlp_adapter": False, "tune_mm_vision_resampler": False,
    "unfreeze_mm_vision_tower": False, "use_cache": False, "use_mm_proj": True, "vision_backbone": "convnext-large",
    "vision_tower_config": None, "vocab_size": 32000,
}
MISTRAL_7B_PARAMS = 7_241_732_096
LLAVA_MED_15_PARAMS = 7_566_219_264  # as released (vocab 32000); 7.57B

# llava-hf/llava-interleave-qwen-0.5b-hf/config.json (Qwen1.5-0.5B-Chat + SigLIP so400m/14 @ 384).
LLAVA_INTERLEAVE_QWEN_05B_HF = {
    "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_seq_length": 729,
    "image_token_index": 151646, "model_type": "llava", "projector_hidden_act": "gelu",
    "text_config": {
        "_name_or_path": "Qwen/Qwen1.5-0.5B-Chat", "architectures": ["Qwen2ForCausalLM"], "bos_token_id": 151643,
        "eos_token_id": 151645, "hidden_size": 1024, "intermediate_size": 2816, "max_position_embeddings": 32768,
        "max_window_layers": 21, "model_type": "qwen2", "num_attention_heads": 16, "num_hidden_layers": 24,
        "num_key_value_heads": 16, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True,
        "torch_dtype": "bfloat16", "use_sliding_window": False, "vocab_size": 152000,
    },
    "vision_config": {
        "hidden_size": 1152, "image_size": 384, "intermediate_size": 4304, "model_type": "siglip_vision_model",
        "num_attention_heads": 16, "num_hidden_layers": 26, "patch_size": 14, "vision_use_head": False,
    },
    "vision_feature_layer": -1, "vision_feature_select_strategy": "full", "tie_word_embeddings": True,
}
LLAVA_INTERLEAVE_QWEN_05B_PARAMS_APPROX = 0.9e9


def llava_med_converted_config() -> dict:
    """The LlavaConfig ``medalign convert llava-med`` writes for the released LLaVA-Med v1.5
    (vocabulary 32000 + <image>, padded to 32064), as a llava-hf style dict."""
    text = {k: v for k, v in LLAVA_MED_15_MISTRAL_7B.items()
            if not k.startswith(("mm_", "tune_mm", "freeze_mm", "unfreeze_mm", "use_mm", "image_", "tokenizer_"))
            and k not in ("architectures", "feature_outs", "img_size", "vision_backbone", "segtok_posembed",
                          "vision_tower_config", "transformers_version", "torch_dtype")}
    text.update({"model_type": "mistral", "vocab_size": 32064})
    return {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "image_token_index": 32000,
        "pad_token_id": 0, "projector_hidden_act": "gelu", "text_config": text, "vision_config": CLIP_VIT_L_14_336,
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "image_seq_length": 576,
        "tie_word_embeddings": False, "dtype": "float16",
    }
