"""SLAKE's release (json + imgs/ with masks) -> prepared files: fields, languages, masks, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from release_fixtures import slake_record, slake_splits, write_slake

from medalign_platform.data.conversations import load_conversation_dataset
from medalign_platform.data.prepare import PrepareError, prepare_dataset
from medalign_platform.data.settings import DataSettings


def prepare(source: Path, cache: Path, **settings):
    return prepare_dataset(DataSettings(name="slake", source=str(source), cache_dir=str(cache), **settings))


def records(prepared, split):
    return json.loads(prepared.split_file(split).read_text(encoding="utf-8"))


@pytest.fixture()
def release(tmp_path):
    return write_slake(tmp_path / "Slake1.0")


def test_records_are_converted_field_by_field(release, tmp_path):
    prepared = prepare(release, tmp_path / "cache")
    train = records(prepared, "train")
    assert [r["id"] for r in train] == ["slake-1", "slake-2", "slake-4", "slake-5"]
    assert train[1] == {
        "id": "slake-2", "image": "xmlab1/source.jpg",
        "conversations": [{"from": "human", "value": "<image>\nWhich organ is abnormal?"},
                          {"from": "gpt", "value": "Lung"}],
        "answer_type": "open", "question_type": "abnormality", "image_id": "xmlab1/source.jpg", "language": "en",
        "split": "train", "dataset": "slake", "mask": "xmlab1/mask.png",
        "meta": {"location": "Lung", "modality": "CT", "base_type": "vqa", "content_type": "Abnormality",
                 "q_lang": "en", "qid": 2, "img_id": 1, "triple": ["vhead", "_", "_"]},
    }
    assert prepared.image_root == (release / "imgs").resolve()


def test_released_splits_are_kept_and_other_languages_counted(release, tmp_path):
    prepared = prepare(release, tmp_path / "cache")
    manifest = prepared.manifest
    assert {s: manifest["splits"][s]["records"] for s in ("train", "val", "test")} == {"train": 4, "val": 2, "test": 2}
    assert [r["meta"]["qid"] for r in records(prepared, "val")] == [7, 8]              # validate.json
    assert manifest["val_carved"] is None
    assert manifest["dropped"]["filtered"] == 4
    assert manifest["dropped"]["filtered_by_reason"] == {"q_lang=zh (data.language=en)": 4}
    assert manifest["masks"] == {"records_with_mask": 8, "masks_dropped": 0}
    zh = prepare(release, tmp_path / "cache", language="zh")
    assert [r["meta"]["qid"] for r in records(zh, "train")] == [3, 6]
    assert all(r["language"] == "zh" for s in ("train", "val", "test") for r in records(zh, s))
    both = prepare(release, tmp_path / "cache", language="all")
    assert both.manifest["splits"]["train"]["records"] == 6 and both.manifest["dropped"]["filtered"] == 0
    assert len({zh.dir, both.dir, prepared.dir}) == 3                     # each setting its own prepared copy


def test_real_masks_load_with_their_images(release, tmp_path):
    prepared = prepare(release, tmp_path / "cache")
    dataset = load_conversation_dataset(prepared.split_file("test"), prepared.image_root)
    item = dataset[0]
    assert item["mask_path"].endswith("imgs/xmlab4/mask.png")
    expected = np.zeros((20, 24), dtype=bool)
    expected[4:10, 4:12] = True
    assert np.array_equal(item["mask"], expected)


def test_validation_json_name_is_accepted_and_both_names_are_a_mixed_layout(release, tmp_path):
    (release / "validate.json").rename(release / "validation.json")
    assert prepare(release, tmp_path / "cache").manifest["splits"]["val"]["records"] == 2
    (release / "validate.json").write_text((release / "validation.json").read_text(encoding="utf-8"), encoding="utf-8")
    with pytest.raises(PrepareError, match="both validate.json and validation.json are present .*mixed layout"):
        prepare(release, tmp_path / "cache")


def test_missing_val_file_carves_val_from_train_by_image(release, tmp_path):
    (release / "validate.json").unlink()
    prepared = prepare(release, tmp_path / "cache", val_fraction=0.3)
    train, val = records(prepared, "train"), records(prepared, "val")
    assert val and not {r["image_id"] for r in train} & {r["image_id"] for r in val}
    assert prepared.manifest["val_carved"]["fraction"] == 0.3


def test_english_record_with_chinese_text_is_an_error_or_skipped(tmp_path):
    splits = slake_splits()
    splits["test.json"][1] = slake_record(11, 4, "这是胸部扫描吗?", "是", q_lang="en")
    source = write_slake(tmp_path / "bad", splits=splits)
    with pytest.raises(PrepareError, match=r"test.json: record 1 \(id='11'\): q_lang is 'en' but the text is not "
                                           r"English .* Fix: set q_lang to 'zh'"):
        prepare(source, tmp_path / "cache")
    skipped = prepare(source, tmp_path / "cache", on_error="skip")
    assert skipped.manifest["dropped"]["skipped_by_reason"] == {"non-English text": 1}
    assert skipped.manifest["splits"]["test"]["records"] == 1


@pytest.mark.parametrize("change,message", [
    ({"answer_type": "BOTH"}, "answer_type is 'BOTH', not CLOSED or OPEN"),
    ({"q_lang": "fr"}, "q_lang is 'fr', not 'en' or 'zh'"),
    ({"img_name": "xmlab9/source.jpg"}, "image file not found: .*xmlab9/source.jpg"),
    ({"img_name": "../../etc/hosts"}, "outside the dataset root"),
])
def test_bad_records_name_the_file_and_record(tmp_path, change, message):
    splits = slake_splits()
    splits["train.json"][0] = {**splits["train.json"][0], **change}
    source = write_slake(tmp_path / "bad", splits=splits)
    with pytest.raises(PrepareError, match=message) as error:
        prepare(source, tmp_path / "cache")
    assert f"{source / 'train.json'}: record 0 (id='1')" in str(error.value)


def test_bad_mask_is_an_error_or_dropped_and_counted(release, tmp_path):
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(release / "imgs" / "xmlab2" / "mask.png")
    with pytest.raises(PrepareError, match=r"mask: mask .*xmlab2/mask.png is 8x8 but the image is 24x20"):
        prepare(release, tmp_path / "cache")
    prepared = prepare(release, tmp_path / "cache", on_error="skip")
    assert prepared.manifest["masks"] == {"records_with_mask": 6, "masks_dropped": 2}
    train = records(prepared, "train")
    assert [("mask" in r) for r in train] == [True, True, False, False]       # xmlab2's records kept, no mask


def test_records_without_a_mask_file_have_no_mask(tmp_path):
    prepared = prepare(write_slake(tmp_path / "nomask", masks=False), tmp_path / "cache")
    assert prepared.manifest["masks"]["records_with_mask"] == 0
    assert all("mask" not in r for r in records(prepared, "train"))


def test_zipped_images_and_wrong_files_name_the_fix(release, tmp_path):
    (release / "imgs").rename(release / "imgs_moved")
    (release / "imgs.zip").write_bytes(b"PK")
    with pytest.raises(PrepareError, match="imgs.zip is not unzipped. Fix: unzip it there"):
        prepare(release, tmp_path / "cache")
    other = tmp_path / "conversations"
    other.mkdir()
    (other / "imgs").mkdir()
    for name in ("train.json", "test.json"):
        (other / name).write_text(json.dumps([{"id": 1, "image": "a.jpg", "conversations": []}]))
    with pytest.raises(PrepareError, match="no record has SLAKE's 'img_name' and 'q_lang' fields.*data=llava_med"):
        prepare(other, tmp_path / "cache")
