"""Parquet mirrors (PathVQA, VQA-RAD, SLAKE-English) through the datasets library; pickles refused."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image
from release_fixtures import image_bytes, pathvqa_rows, write_parquet_mirror

from medalign_platform.data.conversations import load_conversation_dataset
from medalign_platform.data.prepare import PrepareError, prepare_dataset
from medalign_platform.data.settings import DataSettings


def prepare(name: str, source, cache: Path, **settings):
    return prepare_dataset(DataSettings(name=name, source=str(source), cache_dir=str(cache), **settings))


def records(prepared, split):
    return json.loads(prepared.split_file(split).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def pathvqa(tmp_path_factory):
    root = write_parquet_mirror(tmp_path_factory.mktemp("mirror") / "path-vqa", pathvqa_rows())
    return root, prepare("pathvqa", root, tmp_path_factory.mktemp("cache"))


def test_pathvqa_mirror_records_field_by_field(pathvqa):
    _, prepared = pathvqa
    train = records(prepared, "train")
    digest = hashlib.sha256(image_bytes(1)).hexdigest()[:24]
    assert train[0] == {
        "id": "pathvqa-train-0", "image": f"images/{digest[:2]}/{digest}.jpg",
        "conversations": [{"from": "human", "value": "<image>\nIs there inflammation?"},
                          {"from": "gpt", "value": "yes"}],
        "answer_type": "closed", "question_type": None, "image_id": digest, "language": "en", "split": "train",
        "dataset": "pathvqa", "meta": {"row": 0},
    }
    assert [r["answer_type"] for r in train] == ["closed", "open", "closed", "open"]
    assert train[2]["image"].endswith(".png")                                  # the PNG keeps its format
    assert train[1]["image"] == train[0]["image"]                              # same bytes, one file
    assert (prepared.dir / train[0]["image"]).read_bytes() == image_bytes(1)   # written unchanged
    assert prepared.image_root == prepared.dir


def test_pathvqa_splits_overlap_and_inferred_answer_types_are_in_the_manifest(pathvqa):
    _, prepared = pathvqa
    m = prepared.manifest
    assert {s: m["splits"][s]["records"] for s in ("train", "val", "test")} == {"train": 4, "val": 2, "test": 3}
    assert m["splits"]["train"]["images"] == 3 and m["val_carved"] is None
    assert m["overlap"]["train_test_images"] == 1 and m["overlap"]["test_records_on_train_images"] == 1
    assert m["duplicates"]["test_in_train"] == 1                              # same image, same question
    assert m["answer_types"] == {"source": "inferred",
                                 "rule": "closed when the normalised answer is 'yes' or 'no', else open",
                                 "closed": 5, "open": 4}                    # "Yes" counts as yes
    assert len(list((prepared.dir / "images").rglob("*.*"))) == 7             # 7 distinct images


def test_prepared_mirror_loads_with_the_platform_loader(pathvqa):
    _, prepared = pathvqa
    dataset = load_conversation_dataset(prepared.split_file("val"), prepared.image_root)
    assert [item["answer"] for item in dataset] == ["Yes", "liver"]
    assert dataset[0]["image"].size == (24, 20)


def test_vqa_rad_mirror_without_val_gets_a_carved_val(tmp_path):
    rows = {"train": [(image_bytes(k % 4), f"question {k}?", "yes" if k % 2 else "left") for k in range(10)],
            "test": [(image_bytes(9), "is it normal?", "no")]}
    prepared = prepare("vqa_rad", write_parquet_mirror(tmp_path / "vqa-rad", rows), tmp_path / "cache")
    train, val = records(prepared, "train"), records(prepared, "val")
    assert len(train) + len(val) == 10 and val
    assert not {r["image_id"] for r in train} & {r["image_id"] for r in val}
    assert prepared.manifest["layout"] == "parquet" and prepared.manifest["val_carved"]["by"] == "image"


def test_slake_english_mirror_refuses_chinese_text_unless_asked(tmp_path):
    rows = {"train": [(image_bytes(1), "Is this a CT?", "Yes"), (image_bytes(2), "这是CT吗?", "是")],
            "validation": [(image_bytes(3), "Which organ?", "Liver")], "test": [(image_bytes(4), "Where?", "Left")]}
    source = write_parquet_mirror(tmp_path / "slake-en", rows)
    with pytest.raises(PrepareError, match=r"\[train\]: record 1 \(id='train-1'\): the text is not English"):
        prepare("slake", source, tmp_path / "cache")
    everything = prepare("slake", source, tmp_path / "cache", language="all")
    assert [r["language"] for r in records(everything, "train")] == ["en", "other"]


def test_pickled_pathvqa_release_is_refused_without_opening_it(tmp_path):
    release = tmp_path / "pvqa"
    (release / "qas" / "train").mkdir(parents=True)
    # Not a valid pickle: were it ever unpickled, the error would be an UnpicklingError instead.
    (release / "qas" / "train" / "train_qa.pkl").write_bytes(b"\x80\x05not a pickle")
    with pytest.raises(PrepareError, match=r"train_qa.pkl: pickled question files. medalign never unpickles files .*"
                                           r"Fix: use the parquet release instead: "
                                           r"data.source=hf:flaviagiammarino/path-vqa"):
        prepare("pathvqa", release, tmp_path / "cache")
    with pytest.raises(PrepareError, match="pickled question files"):
        prepare("pathvqa", release / "qas" / "train" / "train_qa.pkl", tmp_path / "cache")


@pytest.mark.parametrize("what", ["split", "column", "bytes"])
def test_bad_mirrors_name_the_file_and_the_fix(tmp_path, what):
    rows = {"train": [(image_bytes(1), "q?", "yes")], "validation": [(image_bytes(4), "q?", "no")],
            "test": [(image_bytes(2), "q?", "no")]}
    if what == "split":
        source = write_parquet_mirror(tmp_path / "m", rows, file_names={"test": "data/extra-0.parquet"})
        message = r"extra-0.parquet: cannot tell which split .* name it after its split"
    elif what == "column":
        import datasets

        source = write_parquet_mirror(tmp_path / "m", rows)
        datasets.Dataset.from_dict({"img": ["x"], "question": ["q"], "answer": ["a"]}).to_parquet(
            str(source / "data" / "test-00000-of-00001.parquet"))
        message = r"\[test\]: no column\(s\) \['image'\]"
    else:
        rows["train"].append((image_bytes(3)[:30], "truncated?", "yes"))
        source = write_parquet_mirror(tmp_path / "m", rows)
        message = r"\[train\]: record 1 \(id='train-1'\): its image bytes do not decode .* re-download"
    with pytest.raises(PrepareError, match=message):
        prepare("pathvqa", source, tmp_path / "cache")
    if what == "bytes":
        skipped = prepare("pathvqa", source, tmp_path / "cache", on_error="skip")
        assert skipped.manifest["dropped"]["skipped_by_reason"] == {"unreadable image": 1}


def test_image_paths_in_a_mirror_are_confined_to_its_folder(tmp_path):
    import datasets

    source = tmp_path / "paths"
    (source / "data").mkdir(parents=True)
    Image.new("RGB", (8, 8), (9, 9, 9)).save(source / "a.png")
    Image.new("RGB", (8, 8), (1, 1, 1)).save(tmp_path / "outside.png")
    for split, path in (("train", "a.png"), ("test", "../outside.png")):
        datasets.Dataset.from_dict({"image": [path], "question": ["q?"], "answer": ["yes"]}).to_parquet(
            str(source / "data" / f"{split}-0.parquet"))
    with pytest.raises(PrepareError, match=r"image path '../outside.png' resolves to .*outside the dataset root"):
        prepare("pathvqa", source, tmp_path / "cache")


def test_hub_source_that_cannot_be_reached_names_the_local_route(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PrepareError, match="hf:flaviagiammarino/path-vqa: the datasets library could not open it.*"
                                           "pass their folder as data.source"):
        prepare("pathvqa", "hf:flaviagiammarino/path-vqa", tmp_path / "cache")
    with pytest.raises(PrepareError, match="expected hf:<owner>/<name>"):
        prepare("pathvqa", "hf:not a repo", tmp_path / "cache")
