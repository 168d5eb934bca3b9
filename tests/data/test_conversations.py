"""Conversation dataset loader: SynthMed / LLaVA-Med format, validation and its messages."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile
from torch.utils.data import DataLoader, Dataset

from medalign_platform.data.conversations import (
    ConversationDataset,
    DatasetError,
    DatasetWarning,
    load_conversation_dataset,
    read_mask,
)
from medalign_platform.synthmed.generator import generate_synthmed


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "synthmed"
    generate_synthmed(root, seed=0, n_train=12, n_val=3, n_test=3, workers=1, progress=False)
    return root


def _record(rid, image, question="is there a lesion?", answer="yes", **extra):
    conversations = [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]
    return {"id": rid, "image": image, "conversations": conversations, **extra}


def _write(path: Path, records) -> Path:
    path.write_text(json.dumps(records))
    return path


def test_loads_a_generated_split(synth):
    records = json.loads((synth / "train.json").read_text())
    ds = load_conversation_dataset(synth / "train.json")
    assert isinstance(ds, Dataset) and isinstance(ds, ConversationDataset)
    assert len(ds) == len(records) == ds.num_records and ds.skipped == []
    for i in (0, len(ds) // 2, len(ds) - 1):
        item, record = ds[i], records[i]
        assert item["id"] == record["id"] and item["image_id"] == record["image_id"] and item["turn"] == 0
        assert item["image"].mode == "RGB" and item["image"].size == (64, 64)
        assert item["question"] == record["conversations"][0]["value"].removeprefix("<image>\n")
        assert "<image>" not in item["question"] and item["image_token"] == "start"
        assert item["raw_question"] == record["conversations"][0]["value"]
        assert item["answer"] == record["conversations"][1]["value"]
        assert item["answer_type"] == record["answer_type"] and item["question_type"] == record["question_type"]
        assert item["mask"].dtype == np.bool_ and item["mask"].shape == (64, 64)
        assert Path(item["image_path"]) == synth / record["image"]
    presence = [ds[i] for i in range(len(ds)) if ds.items[i].question_type == "presence"]
    assert presence
    for item in presence:   # "in the <place> quadrant, is there a lesion?": its mask is the lesion, or the empty place
        place = item["question"].removeprefix("in the ").split(" quadrant")[0]
        box = np.zeros((64, 64), bool)
        box[slice(0, 32) if place.endswith("upper") else slice(32, 64),
            slice(0, 32) if place.startswith("left") else slice(32, 64)] = True
        assert item["mask"].any() and not (item["mask"] & ~box).any()
        assert item["answer"] == ("no" if item["mask"].all(where=box) else "yes")
    loader = DataLoader(ds, batch_size=4, collate_fn=list)
    assert len(next(iter(loader))) == 4


def test_image_root_other_than_the_json_folder(synth, tmp_path):
    shutil.copy(synth / "val.json", tmp_path / "val.json")
    ds = load_conversation_dataset(tmp_path / "val.json", image_root=synth)
    assert len(ds) > 0 and ds[0]["image"].size == (64, 64)
    with pytest.raises(DatasetError, match="image_root"):
        load_conversation_dataset(tmp_path / "val.json")             # images are not next to this JSON


def _bad_cases(synth: Path, tmp: Path) -> dict:
    good_png = synth / "images" / "train-00000.png"
    data = good_png.read_bytes()
    (tmp / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp / "garbage.png").write_bytes(b"this is not an image at all" * 10)
    return {
        "missing image": _record("bad", str(tmp / "nope.png")),
        "truncated png": _record("bad", str(tmp / "truncated.png")),
        "non-image bytes": _record("bad", str(tmp / "garbage.png")),
        "empty conversation": {"id": "bad", "image": str(good_png), "conversations": []},
        "no conversations key": {"id": "bad", "image": str(good_png)},
        "missing answer (no gpt turn)": {"id": "bad", "image": str(good_png),
                                         "conversations": [{"from": "human", "value": "<image>\nq?"}]},
        "empty answer": _record("bad", str(good_png), answer="  "),
        "missing human turn": {"id": "bad", "image": str(good_png),
                               "conversations": [{"from": "gpt", "value": "yes"}]},
        "no image field": {"id": "bad", "conversations": _record("x", "x")["conversations"]},
        "mask of another size": _record("bad", str(good_png), mask=str(tmp / "small_mask.png")),
    }


def _dataset_with(synth: Path, tmp: Path, bad: dict) -> Path:
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp / "small_mask.png")
    good = [_record(f"good{i}", str(synth / "images" / f"train-{i:05d}.png")) for i in range(3)]
    return _write(tmp / "set.json", good[:2] + [bad] + good[2:])


@pytest.mark.parametrize("case", [
    "missing image", "truncated png", "non-image bytes", "empty conversation", "no conversations key",
    "missing answer (no gpt turn)", "empty answer", "missing human turn", "no image field", "mask of another size",
])
def test_each_bad_record_raises_a_dataset_error_naming_file_record_and_fix(synth, tmp_path, case):
    bad = _bad_cases(synth, tmp_path)[case]
    path = _dataset_with(synth, tmp_path, bad)
    with pytest.raises(DatasetError) as info:
        load_conversation_dataset(path, image_root=synth)  # the good images live there, the bad ones beside the JSON
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert str(path) in message and "record 2" in message and "id='bad'" in message and "Fix:" in message
    assert (bad.get("image") or "<none>") in message
    assert "on_error='skip'" in message


def test_truncated_png_is_caught_even_when_pil_is_told_to_load_truncated_images(synth, tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    path = _dataset_with(synth, tmp_path, _bad_cases(synth, tmp_path)["truncated png"])
    with pytest.raises(DatasetError, match="truncated|unreadable"):
        load_conversation_dataset(path, image_root=synth)


def test_skip_drops_and_counts_bad_records_and_keeps_good_ones(synth, tmp_path):
    cases = _bad_cases(synth, tmp_path)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "small_mask.png")
    records = []
    for i, (name, bad) in enumerate(cases.items()):
        records.append(_record(f"good{i}", str(synth / "images" / f"train-{i % 12:05d}.png")))
        records.append(dict(bad, id=f"bad-{name}"))
    path = _write(tmp_path / "mixed.json", records)
    with pytest.warns(DatasetWarning, match=f"skipped {len(cases)} of {len(records)} records"):
        ds = load_conversation_dataset(path, image_root=synth, on_error="skip")
    assert len(ds) == len(cases) and [item.id for item in ds.items] == [f"good{i}" for i in range(len(cases))]
    assert [index for index, _ in ds.skipped] == list(range(1, len(records), 2))
    for (_, reason), name in zip(ds.skipped, cases):
        assert f"bad-{name}" in reason
    with pytest.raises(DatasetError, match="none of the"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DatasetWarning)
            load_conversation_dataset(_write(tmp_path / "allbad.json", records[1::2]), image_root=synth,
                                      on_error="skip")


def test_multi_turn_records_yield_one_item_per_question_answer_pair(synth, tmp_path):
    image = str(synth / "images" / "train-00001.png")
    record = {"id": "multi", "image": image, "conversations": [
        {"from": "system", "value": "you are a radiologist."},
        {"from": "human", "value": "<image>\nis there a lesion?"},
        {"from": "gpt", "value": "Yes"},
        {"from": "human", "value": "where is it?"},
        {"from": "gpt", "value": "left upper quadrant"},
        {"role": "user", "content": "describe the findings. <image>"},
        {"role": "assistant", "content": "one lesion: a small round bright lesion in the left upper quadrant."},
    ]}
    ds = load_conversation_dataset(_write(tmp_path / "multi.json", [record]), image_root=synth)
    assert len(ds) == 3 and ds.num_records == 1
    items = [ds[i] for i in range(3)]
    assert [it["turn"] for it in items] == [0, 1, 2] and {it["id"] for it in items} == {"multi"}
    assert [it["question"] for it in items] == ["is there a lesion?", "where is it?", "describe the findings."]
    assert [it["image_token"] for it in items] == ["start", None, "end"]
    assert [it["answer_type"] for it in items] == ["closed", "open", "open"]
    assert all(it["mask"] is None and it["image"].size == (64, 64) for it in items)


def test_llava_med_variants_jsonl_uppercase_types_and_report_sets(synth, tmp_path):
    lines = [_record("q1", "images/train-00002.png", answer="no", answer_type="CLOSED"),
             _record("r1", "images/train-00003.png", question="write the report.",
                     answer="no lesion. normal study.")]
    path = tmp_path / "set.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n\n")
    ds = load_conversation_dataset(path, image_root=synth, default_answer_type="report")
    assert [it.answer_type for it in ds.items] == ["closed", "report"]
    assert ds[1]["answer"] == "no lesion. normal study." and ds[1]["question_type"] is None
    path.write_text(json.dumps(lines[0]) + "\n{not json\n")
    with pytest.raises(DatasetError, match="record 1.*not valid JSON"):
        load_conversation_dataset(path, image_root=synth)


def test_file_level_errors(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        load_conversation_dataset(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(DatasetError, match="not valid JSON"):
        load_conversation_dataset(tmp_path / "broken.json")
    with pytest.raises(DatasetError, match="no records"):
        load_conversation_dataset(_write(tmp_path / "empty.json", []))
    with pytest.raises(DatasetError, match="expected a JSON list"):
        load_conversation_dataset(_write(tmp_path / "obj.json", {"a": 1}))
    with pytest.raises(ValueError, match="on_error"):
        load_conversation_dataset(tmp_path / "empty.json", on_error="ignore")


def test_read_mask_is_boolean(synth):
    labels = np.asarray(Image.open(synth / "masks" / "train-00000.png"))
    assert np.array_equal(read_mask(synth / "masks" / "train-00000.png"), labels > 0)


def test_validation_is_fast_enough(synth, tmp_path):
    import time

    # 600 records over the 18 images: parsing and (cached) decoding must be quick
    records = [_record(f"r{i}", f"images/train-{i % 12:05d}.png", mask=f"masks/train-{i % 12:05d}.png")
               for i in range(600)]
    start = time.perf_counter()
    ds = load_conversation_dataset(_write(synth / "many.json", records))
    assert len(ds) == 600 and time.perf_counter() - start < 2.0
    (synth / "many.json").unlink()
