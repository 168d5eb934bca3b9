"""VQA-RAD's OSF release -> prepared conversation files: fields, splits, manifest and every error."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from release_fixtures import VQA_RAD_IMAGES, VQA_RAD_JSON, vqa_rad_record, vqa_rad_records, write_image, write_vqa_rad

from medalign_platform.data.conversations import load_conversation_dataset
from medalign_platform.data.prepare import PrepareError, prepare_dataset
from medalign_platform.data.settings import DataSettings


def prepare(source: Path, cache: Path, **settings):
    return prepare_dataset(DataSettings(name="vqa_rad", source=str(source), cache_dir=str(cache), **settings))


@pytest.fixture()
def release(tmp_path):
    return write_vqa_rad(tmp_path / "VQA_RAD")


def records(prepared, split):
    return json.loads(prepared.split_file(split).read_text())


def test_records_are_converted_field_by_field(release, tmp_path):
    prepared = prepare(release, tmp_path / "cache")
    everything = {r["id"]: r for split in ("train", "val", "test") for r in records(prepared, split)}
    assert len(everything) == 10
    first = everything["vqa_rad-1"]
    assert first == {
        "id": "vqa_rad-1", "image": "synpic1.jpg",
        "conversations": [{"from": "human", "value": "<image>\nIs there a pneumothorax?"},
                          {"from": "gpt", "value": "No"}],
        "answer_type": "closed", "question_type": "pres", "image_id": "synpic1.jpg", "language": "en",
        "split": "train", "dataset": "vqa_rad",
        "meta": {"qid": 1, "phrase_type": "freeform", "qid_linked_id": "012018", "image_organ": "CHEST",
                 "evaluation": "not evaluated", "question_relation": "NULL", "question_frame": "NULL"},
    }
    assert everything["vqa_rad-3"]["conversations"][1]["value"] == "2"          # a number in the JSON
    assert everything["vqa_rad-3"]["question_type"] == "count"
    assert everything["vqa_rad-4"]["answer_type"] == "open"                     # "open" lowercase in the JSON
    assert everything["vqa_rad-5"]["answer_type"] == "closed"                   # "Closed"
    assert everything["vqa_rad-10"]["question_type"] == "size, pres"
    assert all("question_rephrase" not in r["meta"] and "image_case_url" not in r["meta"] for r in everything.values())
    assert prepared.image_root == (release / VQA_RAD_IMAGES).resolve()


def test_splits_follow_phrase_type_and_val_is_carved_by_image(release, tmp_path):
    prepared = prepare(release, tmp_path / "cache")
    train, val, test = (records(prepared, s) for s in ("train", "val", "test"))
    assert sorted(r["meta"]["qid"] for r in test) == [8, 9, 10]
    assert {r["meta"]["phrase_type"] for r in train + val} <= {"freeform", "para"}
    assert len(train) + len(val) == 7 and len(val) >= 1
    assert not {r["image_id"] for r in train} & {r["image_id"] for r in val}      # no image in both
    assert all(r["split"] == "val" for r in val)
    manifest = prepared.manifest
    assert manifest["val_carved"] == {"from": "train", "by": "image", "fraction": 0.1, "seed": 0}
    assert manifest["splits"]["test"] == {"records": 3, "images": 2, "closed": 2, "open": 1, "with_mask": 0}
    # the same seed carves the same val; the carve does not depend on record order
    shuffled = write_vqa_rad(tmp_path / "shuffled", records=list(reversed(vqa_rad_records())))
    again = prepare(shuffled, tmp_path / "cache2")
    assert {r["id"] for r in records(again, "val")} == {r["id"] for r in val}


def test_manifest_reports_shared_images_and_duplicate_questions_without_changing_them(release, tmp_path):
    prepared = prepare(release, tmp_path / "cache")
    manifest = prepared.manifest
    train_images = {r["image_id"] for r in records(prepared, "train") + records(prepared, "val")}
    assert "synpic1.jpg" in train_images                                          # qid 1-3 are on synpic1
    shared = manifest["overlap"]["train_test_images"] + manifest["overlap"]["val_test_images"]
    assert shared == 1                                                             # synpic1: train and test
    # qid 8 asks qid 1's question on the same image: a test duplicate of a train question, kept
    in_train = manifest["duplicates"]["test_in_train"] + manifest["duplicates"]["test_in_val"]
    assert in_train == 1 and manifest["splits"]["test"]["records"] == 3
    assert manifest["dropped"]["skipped"] == 0 and manifest["dropped"]["filtered"] == 0
    assert manifest["answer_types"] == {"source": "released", "rule": None, "closed": 5, "open": 5}
    assert manifest["layout"] == "osf_json" and manifest["source"] == str(release.resolve())


def test_prepared_files_load_with_the_platform_loader(release, tmp_path):
    prepared = prepare(release, tmp_path / "cache")
    dataset = load_conversation_dataset(prepared.split_file("test"), prepared.image_root)
    assert len(dataset) == 3
    item = dataset[0]
    assert item["question"] == "Is there a pneumothorax?" and item["answer"] == "no"
    assert item["answer_type"] == "closed" and item["image"].size == (24, 20)


def test_the_json_file_itself_is_a_valid_source(release, tmp_path):
    prepared = prepare(release / VQA_RAD_JSON, tmp_path / "cache")
    assert prepared.manifest["splits"]["test"]["records"] == 3


def _with_record(tmp_path, **changes) -> Path:
    rows = vqa_rad_records()
    rows[3] = {**rows[3], **changes}                     # qid 4, record index 3
    return write_vqa_rad(tmp_path / "bad", records=rows)


@pytest.mark.parametrize("change,message", [
    ({"answer_type": "MAYBE"}, "answer_type is 'MAYBE', not CLOSED or OPEN. Fix: set answer_type to CLOSED"),
    ({"answer": "  "}, "field 'answer' is empty. Fix: fill in the record's answer"),
    ({"answer": None}, "field 'answer' is None"),
    ({"phrase_type": "paraphrase"}, "phrase_type is 'paraphrase'. Fix: use freeform/para"),
    ({"image_name": "missing.jpg"}, "image file not found: .*missing.jpg. Fix: restore the file"),
    ({"image_name": "../outside.jpg"}, "image path '../outside.jpg' resolves to .*outside the dataset root"),
    ({"image_name": "/etc/passwd"}, "image path '/etc/passwd' is absolute"),
    ({"question": "这是什么器官?"}, "the text is not English"),
])
def test_bad_records_name_the_file_the_record_and_the_fix(tmp_path, change, message):
    source = _with_record(tmp_path, **change)
    with pytest.raises(PrepareError, match=message) as error:
        prepare(source, tmp_path / "cache")
    text = str(error.value)
    assert f"{source / VQA_RAD_JSON}: record 3 (id='4')" in text and "data.on_error=skip" in text
    assert not list((tmp_path / "cache" / "datasets" / "vqa_rad").glob("data-*"))    # nothing half-built


def test_skip_drops_and_counts_bad_records_by_reason(tmp_path):
    rows = vqa_rad_records()
    rows[3]["answer_type"] = "MAYBE"
    rows[5]["image_name"] = "missing.jpg"
    rows[6]["answer"] = ""
    prepared = prepare(write_vqa_rad(tmp_path / "bad", records=rows), tmp_path / "cache", on_error="skip")
    dropped = prepared.manifest["dropped"]
    assert dropped["skipped"] == 3
    assert dropped["skipped_by_reason"] == {"unknown answer type": 1, "missing image": 1, "empty answer": 1}
    assert len(dropped["skipped_examples"]) == 3 and "record 3 (id='4')" in dropped["skipped_examples"][0]
    kept = {r["meta"]["qid"] for s in ("train", "val", "test") for r in records(prepared, s)}
    assert kept == {1, 2, 3, 5, 8, 9, 10}


def test_corrupt_image_is_an_error_naming_the_file(release, tmp_path):
    image = release / VQA_RAD_IMAGES / "synpic3.jpg"
    image.write_bytes(image.read_bytes()[:40])                      # truncated JPEG
    with pytest.raises(PrepareError, match=r"record 4 \(id='5'\): unreadable image .*synpic3.jpg.*re-download"):
        prepare(release, tmp_path / "cache")


def test_symlink_out_of_the_dataset_root_is_refused(release, tmp_path):
    outside = write_image(tmp_path / "elsewhere" / "secret.jpg", seed=7)
    os.symlink(outside, release / VQA_RAD_IMAGES / "linked.jpg")
    rows = vqa_rad_records()
    rows[0]["image_name"] = "linked.jpg"
    (release / VQA_RAD_JSON).write_text(json.dumps(rows))
    with pytest.raises(PrepareError, match=r"record 0 \(id='1'\): image path 'linked.jpg' resolves to .*secret.jpg, "
                                           r"outside the dataset root .* \(through a symlink\)"):
        prepare(release, tmp_path / "cache")
    # a symlink that stays inside the root is fine
    os.remove(release / VQA_RAD_IMAGES / "linked.jpg")
    os.symlink(release / VQA_RAD_IMAGES / "synpic2.jpg", release / VQA_RAD_IMAGES / "linked.jpg")
    prepared = prepare(release, tmp_path / "cache")
    first = next(r for s in ("train", "val") for r in records(prepared, s) if r["id"] == "vqa_rad-1")
    assert first["image"] == "synpic2.jpg"                        # stored as the file it resolves to


def test_wrong_and_mixed_layouts_are_errors(tmp_path):
    from release_fixtures import write_parquet_mirror, image_bytes, write_slake

    slake = write_slake(tmp_path / "slake")
    with pytest.raises(PrepareError, match="not a vqa_rad release .* It looks like a slake release: use data=slake"):
        prepare(slake, tmp_path / "cache")
    mixed = write_vqa_rad(tmp_path / "mixed")
    write_parquet_mirror(mixed, {"train": [(image_bytes(1), "q?", "yes")], "test": [(image_bytes(2), "q?", "no")]})
    with pytest.raises(PrepareError, match="more than one layout of vqa_rad .* mixed layout.*data.layout=osf_json"):
        prepare(mixed, tmp_path / "cache")
    assert prepare(mixed, tmp_path / "cache", layout="osf_json").manifest["layout"] == "osf_json"
    not_vqa = tmp_path / "other"
    not_vqa.mkdir()
    (not_vqa / VQA_RAD_JSON).write_text(json.dumps([{"id": 1, "image": "x.jpg", "conversations": []}]))
    with pytest.raises(PrepareError, match="no record has VQA-RAD's 'image_name' and 'phrase_type' fields"):
        prepare(not_vqa, tmp_path / "cache")
    (not_vqa / VQA_RAD_JSON).write_text("[{\"qid\": 1,")
    with pytest.raises(PrepareError, match=r"not valid JSON .* re-download"):
        prepare(not_vqa, tmp_path / "cache")


def test_missing_image_folder_names_the_fix(tmp_path):
    source = tmp_path / "no_images"
    source.mkdir()
    (source / VQA_RAD_JSON).write_text(json.dumps([vqa_rad_record(1, "synpic1.jpg", "q?", "yes", "CLOSED", "freeform")]))
    with pytest.raises(PrepareError, match="no image folder .*VQA_RAD Image Folder.*unzip the OSF download"):
        prepare(source, tmp_path / "cache")


def test_english_only_release_refuses_other_languages(release, tmp_path):
    with pytest.raises(PrepareError, match=r"data.language='zh' is not valid. Fix: use one of \['en'\] for vqa_rad"):
        prepare(release, tmp_path / "cache", language="zh")
