"""Prepare orchestration: cache and fingerprint, atomic builds, the val carve, the CLI, configs, presets."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from release_fixtures import (
    iu_xray_annotation,
    mimic_annotation,
    pathvqa_rows,
    write_llava_json,
    write_parquet_mirror,
    write_r2gen,
    write_slake,
    write_vqa_rad,
)

from medalign_platform.cli import main
from medalign_platform.data import prepare as prepare_module
from medalign_platform.data.adapters.base import RecordRef, Sample
from medalign_platform.common.errors import ConfigError
from medalign_platform.data.conversations import DatasetError
from medalign_platform.data.prepare import PrepareError, carve_val, prepare_dataset
from medalign_platform.data.settings import DataSettings


def settings(source, cache, name="vqa_rad", **extra):
    return DataSettings(name=name, source=str(source), cache_dir=str(cache), **extra)


# --------------------------------------------------------------------------- cache and atomicity


def test_prepared_copy_is_reused_until_the_release_or_a_setting_changes(tmp_path):
    source = write_vqa_rad(tmp_path / "VQA_RAD")
    first = prepare_dataset(settings(source, tmp_path / "cache"))
    again = prepare_dataset(settings(source, tmp_path / "cache"))
    assert first.built and not again.built and again.dir == first.dir
    other_seed = prepare_dataset(settings(source, tmp_path / "cache", split_seed=1))
    assert other_seed.built and other_seed.dir != first.dir
    annotation = source / "VQA_RAD Dataset Public.json"
    rows = json.loads(annotation.read_text())
    rows[0]["answer"] = "Yes"
    annotation.write_text(json.dumps(rows))                           # an edited release: new size / time
    edited = prepare_dataset(settings(source, tmp_path / "cache"))
    assert edited.built and edited.dir != first.dir
    assert json.loads(edited.split_file("train").read_text())[0]["conversations"][1]["value"] == "Yes"
    forced = prepare_dataset(settings(source, tmp_path / "cache"), rebuild=True)
    assert forced.built and forced.dir == edited.dir


def test_an_interrupted_prepare_leaves_nothing_half_built(tmp_path, monkeypatch):
    source = write_vqa_rad(tmp_path / "VQA_RAD")
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        raise KeyboardInterrupt  # e.g. Ctrl-C while the files are being written

    monkeypatch.setattr(prepare_module, "split_statistics", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(settings(source, tmp_path / "cache"))
    root = tmp_path / "cache" / "datasets" / "vqa_rad"
    assert calls and sorted(p.name for p in root.iterdir()) == [".prepare.lock"]
    monkeypatch.undo()
    kept = prepare_dataset(settings(source, tmp_path / "cache"))
    assert kept.built
    # an interrupted rebuild keeps the copy that was there
    monkeypatch.setattr(prepare_module, "split_statistics", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(settings(source, tmp_path / "cache"), rebuild=True)
    assert sorted(p.name for p in root.iterdir()) == [".prepare.lock", kept.dir.name]
    assert json.loads(kept.split_file("test").read_text())[0]["id"] == "vqa_rad-8"


def test_settings_are_checked_before_anything_is_read(tmp_path):
    source = write_vqa_rad(tmp_path / "VQA_RAD")
    for extra, message in [  # the typed section rejects these as it is built
        ({"val_fraction": 1.5}, r"data.val_fraction must be > 0, < 1, got 1.5"),
        ({"on_error": "ignore"}, r"data.on_error must be one of 'raise', 'skip', got 'ignore'"),
        ({"verify_images": "all"}, r"data.verify_images must be one of 'decode', 'header', 'exists', got 'all'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            prepare_dataset(settings(source, tmp_path / "cache", **extra))
    # what depends on the release's adapter is checked before anything is read
    with pytest.raises(PrepareError, match=r"data.layout='r2gen' is not valid. Fix: use auto or one of \['osf_json', "
                                           r"'parquet'\]"):
        prepare_dataset(settings(source, tmp_path / "cache", layout="r2gen"))
    with pytest.raises(PrepareError, match=r"data.name='nih_cxr': no adapter for it. Fix: use one of \["):
        prepare_dataset(settings(source, tmp_path / "cache", name="nih_cxr"))
    with pytest.raises(PrepareError, match="data.source='/nowhere': no such file or folder"):
        prepare_dataset(DataSettings(name="vqa_rad", source="/nowhere", cache_dir=str(tmp_path)))


def _samples(images: dict[str, int]) -> list[Sample]:
    out = []
    for image, count in images.items():
        for k in range(count):
            out.append(Sample(id=f"{image}-{k}", split="train", image=image, question=f"q{k}", answer="yes",
                              answer_type="closed", question_type=None, image_id=image, ref=RecordRef("f", 0, "x")))
    return out


def test_val_carve_takes_whole_images_deterministically():
    samples = _samples({f"img{i}.jpg": 1 + i % 3 for i in range(40)})      # 79 questions on 40 images
    train, val = carve_val(samples, 0.2, seed=0)
    assert len(train) + len(val) == len(samples)
    assert not {s.image_id for s in train} & {s.image_id for s in val}
    assert math.ceil(0.2 * 79) <= len(val) <= math.ceil(0.2 * 79) + 2       # stops at the first image past 20%
    again_train, again_val = carve_val(list(reversed(samples)), 0.2, seed=0)
    assert {s.id for s in again_val} == {s.id for s in val}
    assert {s.id for s in carve_val(samples, 0.2, seed=1)[1]} != {s.id for s in val}
    tiny_train, tiny_val = carve_val(_samples({"a": 5, "b": 1}), 0.9, seed=0)
    assert tiny_train and tiny_val                                          # one image stays in train
    with pytest.raises(PrepareError, match="cannot carve a val split by image from a train split with 1 image"):
        carve_val(_samples({"a": 3}), 0.1, seed=0)


# --------------------------------------------------------------------------- LLaVA conversation JSON


def test_original_work_conversation_files_keep_loading_as_before(tmp_path):
    from medalign_platform.data.splits import load_split

    source = write_llava_json(tmp_path / "llava")
    data = {"train": str(source / "train.json"), "val": str(source / "test.json"), "test": str(source / "test.json"),
            "image_root": str(source), "answer_types": ["closed", "open"]}
    items = load_split(data, "train")
    assert [items.dataset.items[i].answer_type for i in items.indices] == ["closed", "open", "closed", "open"]
    prepared = prepare_dataset(settings(source, tmp_path / "cache", name="llava_med"))
    records = {r["id"]: r for s in ("train", "val", "test") for r in json.loads(prepared.split_file(s).read_text())}
    assert records["q3"]["answer_type"] == "closed" and records["q4"]["answer_type"] == "open"   # "Closed"; inferred
    assert records["q2"]["conversations"][0]["value"] == "<image>\nWhat is abnormal?"
    assert records["q2"]["image"] == "images/img1.jpg" and prepared.manifest["val_carved"]["by"] == "image"


def test_llava_json_images_outside_the_folder_are_refused(tmp_path):
    source = write_llava_json(tmp_path / "llava")
    rows = json.loads((source / "train.json").read_text())
    rows[1]["image"] = str(tmp_path / "elsewhere.jpg")
    from release_fixtures import write_image

    write_image(tmp_path / "elsewhere.jpg", seed=3)
    (source / "train.json").write_text(json.dumps(rows))
    # The conversation loader refuses it before any file is opened (DatasetError, which
    # PrepareError specialises), naming the JSON file, the record, the path and the fix.
    with pytest.raises(DatasetError, match=r"train.json: record 1 \(id='q2'[^)]*\): image path "
                                           r"'.*elsewhere.jpg' leaves the dataset root \([^()]*llava\)\. Fix: "):
        prepare_dataset(settings(source, tmp_path / "cache", name="llava_med"))


# --------------------------------------------------------------------------- CLI


def test_cli_prepares_and_prints_the_split_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEDALIGN_CACHE", str(tmp_path / "cache"))
    source = write_vqa_rad(tmp_path / "VQA_RAD")
    assert main(["prepare", "data=vqa_rad", f"data.source={source}", "data.val_fraction=0.3"]) == 0
    out = capsys.readouterr().out
    assert "vqa_rad (osf_json) from" in out and "prepared in" in out
    lines = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith("  ")}
    assert lines["test"] == ["3", "2", "2", "1", "0"]                      # records images closed open masks
    assert int(lines["train"][0]) + int(lines["val"][0]) == 7
    assert "val: carved from train by image (30% of train questions, seed 0)" in out
    assert "train/test image overlap:" in out and "reported, not changed" in out
    assert "test also in train" in out
    assert main(["prepare", "data=vqa_rad", f"data.source={source}", "data.val_fraction=0.3"]) == 0
    assert "already prepared" in capsys.readouterr().out
    assert main(["prepare", "data=vqa_rad", f"data.source={source}", "rebuild=true", "data.val_fraction=0.3"]) == 0
    assert "preparing vqa_rad" in capsys.readouterr().out


def test_cli_errors_are_one_line_with_the_fix(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEDALIGN_CACHE", str(tmp_path / "cache"))
    assert main(["prepare", "data=vqa_rad"]) == 2
    assert "medalign prepare: data.source is not set (got None). Fix: pass data.source=PATH" in capsys.readouterr().err
    slake = write_slake(tmp_path / "slake")
    assert main(["prepare", "data=pathvqa", f"data.source={slake}"]) == 2
    err = capsys.readouterr().err
    assert "not a pathvqa release" in err and "It looks like a slake release: use data=slake" in err


# --------------------------------------------------------------------------- configs and presets


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    root = tmp_path_factory.mktemp("releases")
    return {
        "vqa_rad": write_vqa_rad(root / "VQA_RAD"),
        "slake": write_slake(root / "Slake1.0"),
        "pathvqa": write_parquet_mirror(root / "path-vqa", pathvqa_rows()),
        "iu_xray": write_r2gen(root / "iu_xray", iu_xray_annotation()),
        "mimic_cxr": write_r2gen(root / "mimic", mimic_annotation()),
    }


# (layer, lambda_align, lambda_attn, lora rank, epochs) from ../shared/method.md (PathVQA: VQA-RAD's,
# MIMIC-CXR: IU-Xray's, SLAKE's LoRA: VQA-RAD's; the original publishes none of those).
ORIGINAL = {"vqa_rad": (20, 1.0, 0.06, 32, 9), "slake": (16, 1.0, 0.03, 32, 6), "pathvqa": (20, 1.0, 0.06, 32, 9),
            "iu_xray": (20, 1.0, 0.03, 64, 12), "mimic_cxr": (20, 1.0, 0.03, 64, 12)}


@pytest.mark.parametrize("name", sorted(ORIGINAL))
def test_presets_compose_the_original_settings_on_prepared_data(name, releases, tmp_path, monkeypatch):
    from medalign_platform.run.compose import compose_config

    monkeypatch.setenv("MEDALIGN_CACHE", str(tmp_path / "cache"))
    config = compose_config([f"experiment={name}_medalign", f"data.source={releases[name]}"])
    data, trainer, ray = config["data"], config["trainer"], config["ray"]
    prepared = Path(data["train"]).parent
    assert prepared.parent == tmp_path / "cache" / "datasets" / name and prepared.name.startswith("data-")
    manifest = json.loads((prepared / "manifest.json").read_text())
    for split in ("train", "val", "test"):
        assert data[split] == str(prepared / f"{split}.json")
    assert Path(data["image_root"]).is_dir() and data["validate_images"] is False and data["max_length"] == 1024
    layer, lambda_align, lambda_attn, rank, epochs = ORIGINAL[name]
    distill, lora, optim = config["distill"], config["lora"], config["optim"]
    assert (distill["layer"], distill["lambda_align"], distill["lambda_attn"]) == (layer, lambda_align, lambda_attn)
    assert distill["attention_normalize"] == "l2" and distill["steer"]["mode"] == "full"
    assert (lora["rank"], lora["alpha"], lora["dropout"]) == (rank, 16, 0.05)
    assert (optim["lr"], optim["warmup_ratio"], optim["weight_decay"]) == (2e-4, 0.03, 0.0)
    assert trainer["batch_size"] * trainer["grad_accum"] * ray["num_workers"] == 32
    assert trainer["precision"] == "bf16" and ray["use_gpu"] is True
    assert trainer["max_steps"] == math.ceil(epochs * manifest["splits"]["train"]["records"] / 32)
    assert config["teacher"]["cache_dir"] == str(tmp_path / "cache" / "targets")
    assert data["answer_types"] == (["report"] if name in ("iu_xray", "mimic_cxr") else ["closed", "open"])
    assert ray["checkpoint_score"] == ("val/report_bleu4" if name in ("iu_xray", "mimic_cxr")
                                       else "val/closed_accuracy")


def test_preset_without_a_source_names_the_fix(tmp_path, monkeypatch):
    from medalign_platform.run.compose import ConfigError, compose_config

    monkeypatch.setenv("MEDALIGN_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match="data.source is not set.*Fix: pass data.source=PATH"):
        compose_config(["experiment=vqa_rad_medalign"])


def test_7b_search_space_is_centred_on_the_original_recipes(releases, tmp_path, monkeypatch):
    from medalign_platform.run.compose import compose_config
    from medalign_platform.tune.search_space import load_search_space

    monkeypatch.setenv("MEDALIGN_CACHE", str(tmp_path / "cache"))
    config = compose_config(["experiment=vqa_rad_medalign", f"data.source={releases['vqa_rad']}"])
    space = load_search_space("medalign_7b")
    space.validate(config, depth=32)
    space.validate(config, depth=28)                         # HuatuoGPT-Vision-7B's depth fits too
    points = space.seed_points(config)
    first = points[0]
    assert (first["distill/layer"], first["distill/lambda_align"], first["distill/lambda_attn"],
            first["lora/rank"], first["optim/lr"]) == (20, 1.0, 0.06, 32, 2e-4)
    assert sorted(p["distill/lambda_align"] for p in points[1:4]) == [0.02, 0.08, 0.1]
    params = space.params
    assert params["distill.layer"].low <= 16 and params["distill.layer"].high >= 20
    assert params["distill.lambda_attn"].low < 0.03 and params["distill.lambda_attn"].high > 0.06
    with pytest.raises(Exception, match="distill.layer must be in 1..3"):
        space.validate(config, depth=4)



def test_cli_reports_a_bad_llava_record_as_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEDALIGN_CACHE", str(tmp_path / "cache"))
    source = write_llava_json(tmp_path / "llava")
    rows = json.loads((source / "train.json").read_text())
    rows[2]["conversations"][1]["value"] = ""
    (source / "train.json").write_text(json.dumps(rows))
    assert main(["prepare", "data=llava_med", f"data.source={source}"]) == 2
    err = capsys.readouterr().err
    assert "train.json: record 2 (id='q3'" in err and "missing answer" in err and "Traceback" not in err
