"""What `medalign check` prints for the 7B presets, without the weights (docs/models.md).

The preflight reads only configs, so folders holding the released ``config.json`` values
(``tests/real_configs.py``) stand in for the downloaded models; the data section is a mini
SynthMed (its paths must exist). Run from the repository root:

    PYTHONPATH=platform python benchmarks/preflight_presets.py > docs/preflight_presets.txt
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "platform"), str(ROOT / "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from real_configs import LLAVA_15_7B_HF, llava_med_converted_config  # noqa: E402

OPENAI = {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}
# BiomedBERT-base (microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract) config.json values.
BIOMEDBERT_BASE = {"architectures": ["BertForMaskedLM"], "model_type": "bert", "hidden_size": 768,
                   "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
                   "max_position_embeddings": 512, "vocab_size": 30522, "type_vocab_size": 2}


def write(folder: Path, name: str, data: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(data))
    return folder


def main() -> None:
    from medalign_platform.cli import main as medalign
    from medalign_platform.synthmed.prepare import prepare_mini_synthmed

    tmp = Path(tempfile.mkdtemp(prefix="preflight-presets-"))
    prepare_mini_synthmed(tmp / "cache", n_train=4, n_val=2, n_test=2)
    os.environ["MEDALIGN_CACHE"] = str(tmp / "cache")
    models = tmp / "models"
    write(models / "llava-med-v1.5-mistral-7b-hf", "config.json", llava_med_converted_config())
    llava15 = write(models / "llava-1.5-7b-hf", "config.json", LLAVA_15_7B_HF)
    bert = write(models / "biomedbert", "config.json", BIOMEDBERT_BASE)
    write(models / "unimed-clip-vit-b16", "open_clip_config.json", {
        "model_cfg": {"embed_dim": 512, "quick_gelu": True,
                      "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "head_width": 64,
                                     "mlp_ratio": 4.0, "patch_size": 16},
                      "text_cfg": {"hf_model_name": str(bert), "hf_tokenizer_name": str(bert), "hf_proj_type": "mlp",
                                   "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 256}},
        "preprocess_cfg": OPENAI, "medalign": {"text_tower": "present"}})
    biomedclip = write(models / "biomedclip", "open_clip_config.json", {  # the hub file's schema and values
        "model_cfg": {"embed_dim": 512,
                      "vision_cfg": {"timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False,
                                     "timm_pool": "", "timm_proj": "linear", "image_size": 224},
                      "text_cfg": {"hf_model_name": str(bert), "hf_tokenizer_name": str(bert), "hf_proj_type": "mlp",
                                   "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 256}},
        "preprocess_cfg": OPENAI})
    os.environ["MEDALIGN_MODELS"] = str(models)
    runs = [
        ("LLaVA-Med v1.5 + UniMed-CLIP B/16", ["experiment=llava_med_unimed_7b"]),
        ("LLaVA-1.5-7B + BiomedCLIP", ["experiment=llava15_biomedclip_7b", f"model.path={llava15}",
                                       f"teacher.name=local-dir:{biomedclip}"]),
    ]
    for title, overrides in runs:
        for trainer in (["trainer.batch_size=1"], ["trainer.batch_size=8"],
                        ["trainer.batch_size=16", "trainer.gradient_checkpointing=true"]):
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                code = medalign(["check", *overrides, *trainer, "check.gpus=[A100-40GB,H100-80GB,H200-141GB]"])
            text = out.getvalue().replace(str(models), "$MEDALIGN_MODELS").replace(str(tmp), "$TMP")
            print(f"## {title}: {' '.join(trainer)} (exit {code})\n{text}")


if __name__ == "__main__":
    main()
