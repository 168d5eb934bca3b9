"""IU-Xray and MIMIC-CXR in R2Gen's layout -> report-generation records; view policy; errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from release_fixtures import iu_xray_annotation, mimic_annotation, write_r2gen

from medalign_platform.data.conversations import load_conversation_dataset
from medalign_platform.common.errors import ConfigError
from medalign_platform.data.prepare import PrepareError, prepare_dataset
from medalign_platform.data.settings import DataSettings

PROMPT = "Describe the findings of this chest X-ray."


def prepare(name: str, source: Path, cache: Path, **settings):
    return prepare_dataset(DataSettings(name=name, source=str(source), cache_dir=str(cache), **settings))


def records(prepared, split):
    return json.loads(prepared.split_file(split).read_text())


@pytest.fixture()
def iu(tmp_path):
    return write_r2gen(tmp_path / "iu_xray", iu_xray_annotation())


def test_iu_xray_first_view_records_field_by_field(iu, tmp_path):
    prepared = prepare("iu_xray", iu, tmp_path / "cache")
    train = records(prepared, "train")
    assert train[0] == {
        "id": "iu_xray-CXR1_IM-0001", "image": "CXR1_IM-0001/0.png",
        "conversations": [{"from": "human", "value": f"<image>\n{PROMPT}"},
                          {"from": "gpt", "value": "The heart is normal in size. The lungs are clear."}],
        "answer_type": "report", "question_type": None, "image_id": "CXR1_IM-0001/0.png", "language": "en",
        "split": "train", "dataset": "iu_xray",
        "meta": {"id": "CXR1_IM-0001", "split": "train", "view": 0, "n_views": 2},
    }
    m = prepared.manifest
    assert {s: m["splits"][s]["records"] for s in ("train", "val", "test")} == {"train": 3, "val": 1, "test": 2}
    assert m["splits"]["test"]["report"] == 2 and m["val_carved"] is None and m["task"] == "report"
    assert prepared.image_root == (iu / "images").resolve()
    dataset = load_conversation_dataset(prepared.split_file("test"), prepared.image_root)
    assert dataset[0]["answer_type"] == "report" and dataset[0]["question"] == PROMPT


def test_each_view_policy_makes_one_sample_per_image(iu, tmp_path):
    prepared = prepare("iu_xray", iu, tmp_path / "cache", view_policy="each",
                       report_prompt="Write the report.")
    train = records(prepared, "train")
    assert [r["id"] for r in train[:2]] == ["iu_xray-CXR1_IM-0001-v0", "iu_xray-CXR1_IM-0001-v1"]
    assert [r["image"] for r in train[:2]] == ["CXR1_IM-0001/0.png", "CXR1_IM-0001/1.png"]
    assert train[0]["conversations"][1] == train[1]["conversations"][1]       # the study's report on both
    assert train[0]["conversations"][0]["value"] == "<image>\nWrite the report."
    assert {s: prepared.manifest["splits"][s]["records"] for s in ("train", "val", "test")} == \
        {"train": 6, "val": 2, "test": 4}
    first = prepare("iu_xray", iu, tmp_path / "cache")
    assert first.dir != prepared.dir                                          # a setting of the recipe


def test_mimic_keeps_subject_and_study_ids(tmp_path):
    source = write_r2gen(tmp_path / "mimic", mimic_annotation())
    prepared = prepare("mimic_cxr", source, tmp_path / "cache", verify_images="header")
    train = records(prepared, "train")
    assert train[0]["id"] == "mimic_cxr-50414267-dicom"
    assert train[0]["image"] == "p10/p10000032/s50414267/50414267a.jpg"
    assert train[0]["meta"] == {"id": "50414267-dicom", "split": "train", "subject_id": 10000032,
                                "study_id": 50414267, "view": 0, "n_views": 2}
    assert records(prepared, "val")[0]["meta"]["split"] == "validate"       # kept as released
    assert prepared.manifest["settings"]["verify_images"] == "header"


@pytest.mark.parametrize("change,message", [
    ({"report": ""}, r"\[train\]: record 1 \(id='CXR2_IM-0002'\): field 'report' is empty"),
    ({"image_path": []}, r"record 1 \(id='CXR2_IM-0002'\): image_path is \[\]"),
    ({"image_path": ["../../escape.png"]}, "outside the dataset root"),
    ({"image_path": ["CXR2_IM-0002/9.png"]}, r"image file not found: .*CXR2_IM-0002/9.png"),
])
def test_bad_studies_name_the_file_the_record_and_the_fix(tmp_path, change, message):
    annotation = iu_xray_annotation()
    annotation["train"][1] = {**annotation["train"][1], **change}
    source = write_r2gen(tmp_path / "iu", annotation)
    (source / "images" / "CXR2_IM-0002" / "9.png").unlink(missing_ok=True)  # listed, but not in the download
    with pytest.raises(PrepareError, match=message) as error:
        prepare("iu_xray", source, tmp_path / "cache")
    assert str(source / "annotation.json") in str(error.value) and "Fix:" in str(error.value)
    skipped = prepare("iu_xray", source, tmp_path / "cache", on_error="skip")
    assert skipped.manifest["dropped"]["skipped"] == 1 and skipped.manifest["splits"]["train"]["records"] == 2


def test_wrong_annotation_layout_and_settings_are_errors(iu, tmp_path):
    annotation = iu_xray_annotation()
    del annotation["val"]
    (iu / "annotation.json").write_text(json.dumps(annotation))
    with pytest.raises(PrepareError, match=r"expected R2Gen's \{'train', 'val', 'test'\} lists, missing \['val'\]"):
        prepare("iu_xray", iu, tmp_path / "cache")
    with pytest.raises(ConfigError, match="data.view_policy must be one of 'first', 'each', got 'all'"):
        prepare("iu_xray", iu, tmp_path / "cache", view_policy="all")
    (iu / "annotation.json").write_text(json.dumps(iu_xray_annotation()))
    (iu / "images").rename(iu / "imgs")
    with pytest.raises(PrepareError, match="no image folder .*images.*R2Gen's layout.*data.image_dir"):
        prepare("iu_xray", iu, tmp_path / "cache")
    assert prepare("iu_xray", iu, tmp_path / "cache", image_dir="imgs").manifest["splits"]["train"]["records"] == 3
