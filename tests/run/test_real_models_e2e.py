"""End to end on Ray: a tiny LLaVA-Med release converted by `medalign convert llava-med`, then
`medalign check` and `medalign train` with each teacher kind -- a converted UniMed-CLIP
(open_clip ViT, vision only), a BiomedCLIP-schema local-dir (timm ViT + BERT, prompt-aware
attention and attention token weights) and a PubMedCLIP-style transformers CLIPModel -- on a
mini prepared SynthMed."""

from __future__ import annotations

import json

import pytest
from conftest import NO_RAY_DASHBOARD
from real_formats import tiny_bert, tiny_biomedclip, tiny_llava_med, tiny_pubmedclip, tiny_unimed_pt
from synthmed_fixtures import mini_synthmed_env

from medalign_platform.cli import main


@pytest.mark.slow
def test_check_and_train_with_a_converted_llava_med_and_every_teacher_kind(tmp_path, capsys):
    src, vision = tiny_llava_med(tmp_path / "release")
    student = tmp_path / "llava-med-hf"
    assert main(["convert", "llava-med", str(src), str(student), str(vision)]) == 0
    unimed = tmp_path / "unimed"
    assert main(["convert", "unimed-clip", str(tiny_unimed_pt(tmp_path / "unimed.pt")), str(unimed)]) == 0
    biomed = tiny_biomedclip(tmp_path / "biomedclip")
    pubmed = tiny_pubmedclip(tmp_path / "pubmedclip")
    teachers = {
        "unimed": (f"local-dir:{unimed}", ["teacher.attention=cls"], "grid 4x4 -> student 4x4 (same grid"),
        "biomedclip": (f"local-dir:{biomed}", ["teacher.attention=prompt_aware",
                                               "distill.token_weights=teacher_attention"],
                       "grid 14x14 -> student 4x4 (bilinear downsampling"),
        "pubmedclip": (f"hf-clip:{pubmed}", [], "grid 7x7 -> student 4x4 (bilinear downsampling"),
    }
    common = [
        "experiment=synthmed_vqa", f"model.path={student}", "model.grid=[4,4]", "model.vision_feature_layer=-2",
        "model.prompt_template=mistral_instruct", "data.max_length=256", "distill.layer=2", "trainer.max_steps=2",
        "trainer.batch_size=4", "trainer.eval_every=0", "trainer.val_size=4", "trainer.test_size=4",
        "trainer.eval_batch_size=4", "trainer.max_new_tokens=2", "trainer.log_every=1", f"run.output_dir={tmp_path / 'runs'}",
        "ray.num_workers=1", NO_RAY_DASHBOARD,
    ]
    with mini_synthmed_env(tmp_path / "cache"):
        for name, (teacher, extra, grid_line) in teachers.items():
            overrides = [*common, f"teacher.name={teacher}", *extra, f"run.name={name}",
                         f"teacher.cache_dir={tmp_path / 'targets' / name}"]
            capsys.readouterr()
            assert main(["check", *overrides, "check.gpus=[80]"]) == 0, capsys.readouterr()
            report = capsys.readouterr().out
            assert grid_line in report and "preflight: OK" in report
            assert "per-trial GPU memory" in report and "trials per GPU: 80 GiB GPU:" in report

            assert main(["train", *overrides]) == 0
            summary = json.loads(capsys.readouterr().out.split("\nmedalign train:")[0])
            metrics = summary["metrics"]
            assert metrics["step"] == 2 and metrics["train/lm"] > 0, name
            assert metrics["train/spatial"] > 0 and metrics["train/attention"] > 0, name
            assert "test/closed_accuracy" in metrics or "test/n_closed" in metrics or any(
                k.startswith("test/") for k in metrics), name
            cache = summary["target_cache"]["train"]
            assert cache["misses"] > 0
            if name == "biomedclip":  # per (image, question) maps next to the per-image entries
                assert cache["misses"] > cache["images"]
