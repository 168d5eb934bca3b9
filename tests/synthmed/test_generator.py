"""SynthMed generator: determinism, agreement of every answer with the masks, format, the task's traps."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medalign_platform.synthmed.generator import (
    CONTRASTS,
    QUADRANTS,
    SHAPES,
    SIZES,
    SYNTHMED_PUNCTUATION,
    SYNTHMED_VERSION,
    SYNTHMED_WORDS,
    ensure_synthmed,
    generate_synthmed,
    load_manifest,
    pretrain_file,
    tree_sha256,
)
from medalign_platform.synthmed.questions import ATTRIBUTES

SMALL = {"n_train": 40, "n_val": 10, "n_test": 10, "task_train_images": 30, "image_size": 64, "progress": False}
COUNT_WORDS = ["zero", "one", "two", "three"]
SPLITS = ("train", "val", "test")


def _tree_hash(root: Path) -> str:
    """Independent of the module's own hash: every file, path and bytes, sorted."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    base = tmp_path_factory.mktemp("synthmed")
    a = generate_synthmed(base / "a", seed=0, workers=1, **SMALL)
    b = generate_synthmed(base / "b", seed=0, workers=2, chunk_size=7, **SMALL)   # other process layout
    c = generate_synthmed(base / "c", seed=1, workers=1, **SMALL)
    return base, a, b, c


@pytest.fixture(scope="module")
def dataset(generated):
    """``(root, pretrain records, task records, annotations by image id)`` of generation a."""
    root = generated[0] / "a"
    pretrain = {split: json.loads((root / pretrain_file(split)).read_text()) for split in SPLITS}
    task = {split: json.loads((root / f"{split}.json").read_text()) for split in SPLITS}
    annotations = {ann["id"]: ann for split in SPLITS
                   for ann in json.loads((root / "annotations" / f"{split}.json").read_text())}
    return root, pretrain, task, annotations


def _all(records: dict) -> list[dict]:
    return [r for recs in records.values() for r in recs]


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a bool mask, as lists of (row, col)."""
    seen = np.zeros_like(mask, dtype=bool)
    out = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        stack, comp = [start], []
        while stack:
            r, c = stack.pop()
            comp.append((r, c))
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    rr, cc = r + dr, c + dc
                    if 0 <= rr < mask.shape[0] and 0 <= cc < mask.shape[1] and mask[rr, cc] and not seen[rr, cc]:
                        seen[rr, cc] = True
                        stack.append((rr, cc))
        out.append(np.array(comp))
    return out


def _quadrant(points: np.ndarray, size: int) -> str:
    row, col = points.mean(axis=0)
    return f"{'left' if col < size / 2 else 'right'} {'upper' if row < size / 2 else 'lower'}"


def _truth(root: Path, image_id: str) -> dict:
    labels = np.asarray(Image.open(root / "masks" / f"{image_id}.png"))
    comps = _components(labels > 0)
    size = labels.shape[0]
    quadrants = sorted((_quadrant(c, size) for c in comps), key=QUADRANTS.index)
    return {"labels": labels, "components": comps, "quadrants": quadrants,
            "sides": {q.split()[0] for q in quadrants}}


def test_same_seed_gives_identical_files_for_any_worker_count(generated):
    base, a, b, _ = generated
    assert _tree_hash(base / "a") == _tree_hash(base / "b")
    assert a["tree_sha256"] == b["tree_sha256"] == tree_sha256(base / "a")
    assert (base / "a" / "manifest.json").read_bytes() == (base / "b" / "manifest.json").read_bytes()


def test_different_seed_gives_different_files(generated):
    base, a, _, c = generated
    assert _tree_hash(base / "a") != _tree_hash(base / "c")
    assert a["tree_sha256"] != c["tree_sha256"]
    assert (base / "a" / "images" / "train-00000.png").read_bytes() != (base / "c" / "images" / "train-00000.png").read_bytes()


def test_manifest(generated, dataset):
    base, a, _, _ = generated
    _, pretrain, task, _ = dataset
    manifest = load_manifest(base / "a")
    assert manifest["version"] == SYNTHMED_VERSION and manifest["seed"] == 0 and manifest["task_train_images"] == 30
    assert manifest["sizes"] == {"train": 40, "val": 10, "test": 10}
    for split, n in manifest["sizes"].items():
        info = manifest["splits"][split]
        assert info["images"] == n and info["pretrain"]["records"] == len(pretrain[split])
        assert info["task"]["records"] == len(task[split])
        closed = [r for r in task[split] if r["answer_type"] == "closed"]
        assert info["task"]["closed"] == len(closed)
        if closed:
            assert info["task"]["pooled_reader_accuracy"] == round(
                sum(r["pooled_answer"] == r["conversations"][1]["value"] for r in closed) / len(closed), 4)
    for rel, digest in manifest["files"].items():
        assert hashlib.sha256((base / "a" / rel).read_bytes()).hexdigest() == digest
    assert len(list((base / "a" / "images").glob("*.png"))) == 60
    # only the first task_train_images train images are asked the task
    assert max(int(r["image_id"].split("-")[1]) for r in task["train"]) < 30


def test_records_follow_the_llava_conversation_format(dataset):
    root, pretrain, task, annotations = dataset
    ids = set()
    for kind, records in (("pretrain", pretrain), ("task", task)):
        for r in _all(records):
            base_keys = {"id", "image_id", "image", "mask", "conversations", "answer_type", "question_type"}
            extra = set(r) - base_keys
            assert base_keys <= set(r)
            if kind == "pretrain":
                assert extra == set() and r["answer_type"] in {"closed", "open", "report"}
                assert r["question_type"] in {"presence", "quadrant", "count", "report", *ATTRIBUTES}
            else:
                assert r["answer_type"] in {"closed", "open"}
                assert r["question_type"] == "presence" if r["answer_type"] == "closed" else r["question_type"] in ATTRIBUTES
                wanted = {"quadrant", "attribute", "distractor", "pooled_answer"} if r["answer_type"] == "closed" \
                    else {"quadrant", "attribute"}
                assert extra == wanted
            assert (kind, r["id"]) not in ids
            ids.add((kind, r["id"]))
            assert r["image"] == f"images/{r['image_id']}.png" and (root / r["image"]).is_file()
            assert r["mask"].startswith(f"masks/{r['image_id']}") and (root / r["mask"]).is_file()
            human, gpt = r["conversations"]
            assert human["from"] == "human" and human["value"].startswith("<image>\n")
            assert gpt["from"] == "gpt" and gpt["value"]
        if kind == "pretrain":
            counts = Counter(r["image_id"] for r in _all(records) if r["answer_type"] == "report")
            assert set(counts.values()) == {1} and len(counts) == len(annotations)
    with Image.open(root / pretrain["train"][0]["image"]) as im:
        assert im.mode == "RGB" and im.size == (64, 64)
    with Image.open(root / pretrain["train"][0]["mask"]) as im:
        assert im.mode == "L" and im.size == (64, 64)


def test_all_text_uses_the_small_vocabulary(dataset):
    _, pretrain, task, _ = dataset
    assert SYNTHMED_WORDS == sorted(set(SYNTHMED_WORDS)) and all(w.isalpha() and w.islower() for w in SYNTHMED_WORDS)
    allowed = set(SYNTHMED_WORDS) | set(SYNTHMED_PUNCTUATION)
    used = Counter()
    for r in _all(pretrain) + _all(task):
        for text in (r["conversations"][0]["value"].removeprefix("<image>\n"), r["conversations"][1]["value"]):
            assert text == text.strip() and "  " not in text
            tokens = re.findall(r"[a-z]+|\S", text)
            assert set(tokens) <= allowed, (text, set(tokens) - allowed)
            used.update(t for t in tokens if t.isalpha())
    assert set(used) == set(SYNTHMED_WORDS)


def test_task_closed_answers_are_balanced_per_image_and_need_the_named_place(dataset):
    _, _, task, annotations = dataset
    closed = [r for r in _all(task) if r["answer_type"] == "closed"]
    assert len(closed) >= 60
    by_image = {}
    for r in closed:
        by_image.setdefault(r["image_id"], []).append(r)
        held = {les["quadrant"] for les in annotations[r["image_id"]]["lesions"]}
        assert held and r["conversations"][0]["value"] == f"<image>\nin the {r['quadrant']} quadrant, is there a lesion?"
        assert r["conversations"][1]["value"] == ("yes" if r["quadrant"] in held else "no")
        assert r["pooled_answer"] == "yes" and r["attribute"] == "presence"
        assert r["distractor"] == (r["conversations"][1]["value"] == "no")
    # every image with a lesion (train: the first task_train_images only): one "yes" and one "no",
    # in either order, about two places
    asked = {i for i, ann in annotations.items()
             if ann["lesions"] and not (i.startswith("train-") and int(i.split("-")[1]) >= SMALL["task_train_images"])}
    assert set(by_image) == asked
    for records in by_image.values():
        assert sorted(r["conversations"][1]["value"] for r in records) == ["no", "yes"]
        assert records[0]["quadrant"] != records[1]["quadrant"]
    assert {tuple(r["conversations"][1]["value"] for r in rs) for rs in by_image.values()} == {("yes", "no"), ("no", "yes")}
    # a reader of the whole image ("is there a lesion anywhere?") is at chance
    assert sum(r["pooled_answer"] == r["conversations"][1]["value"] for r in closed) / len(closed) == 0.5


def test_task_open_questions_ask_each_lesion_of_multi_lesion_images(dataset):
    _, _, task, annotations = dataset
    opened = [r for r in _all(task) if r["answer_type"] == "open"]
    assert opened
    for image_id in {r["image_id"] for r in opened}:
        lesions = annotations[image_id]["lesions"]
        asked = [r["quadrant"] for r in opened if r["image_id"] == image_id]
        assert len(lesions) >= 2 and sorted(asked) == sorted(les["quadrant"] for les in lesions)


def test_every_answer_agrees_with_the_masks_and_annotations(dataset):
    root, pretrain, task, annotations = dataset
    for r in _all(pretrain) + _all(task):
        t = _truth(root, r["image_id"])
        lesions = annotations[r["image_id"]]["lesions"]
        k = len(t["components"])
        assert k == len(lesions) and [les["quadrant"] for les in lesions] == t["quadrants"]
        question = r["conversations"][0]["value"].removeprefix("<image>\n")
        answer = r["conversations"][1]["value"]
        qtype, atype = r["question_type"], r["answer_type"]
        relevant = np.asarray(Image.open(root / r["mask"])) > 0
        if "quadrant" in r:   # a task question: its mask is the lesion in the named place, or the empty place
            there = [les for les in lesions if les["quadrant"] == r["quadrant"]]
            assert question.startswith(f"in the {r['quadrant']} quadrant, ")
            if there:
                assert np.array_equal(relevant, t["labels"] == there[0]["label"])
            else:
                rows, cols = np.nonzero(relevant)
                half = relevant.shape[0] // 2
                assert relevant.sum() == half * half and (rows < half).all() == r["quadrant"].endswith("upper")
                assert (cols < half).all() == r["quadrant"].startswith("left")
            if atype == "open":
                assert question.endswith(f"what is the {qtype} of the lesion?") and answer == there[0][qtype]
            else:
                assert question.endswith("is there a lesion?") and answer == ("yes" if there else "no")
        elif qtype == "presence":
            assert question == "is there a lesion?" and answer == ("yes" if k else "no")
        elif qtype == "count":
            assert answer == COUNT_WORDS[k]
        elif qtype == "quadrant":
            assert k > 0 and answer == " and ".join(f"{q} quadrant" for q in t["quadrants"])
        elif qtype == "report":
            if k == 0:
                assert answer == "no lesion. normal study."
            else:
                assert answer.startswith(f"{COUNT_WORDS[k]} lesion")
                assert re.findall(r"in the (\w+ \w+) quadrant", answer) == t["quadrants"]
        else:   # single-lesion attribute questions of the pre-training corpus
            assert k == 1 and qtype in ATTRIBUTES
            if atype == "open":
                assert answer == lesions[0][qtype]
            else:
                value = re.fullmatch(r"is the lesion (\w+)\?", question).group(1)
                assert answer == ("yes" if lesions[0][qtype] == value else "no")
        if "quadrant" not in r:
            assert np.array_equal(relevant, t["labels"] > 0)   # image-level questions: every lesion


def test_masks_hold_zero_to_three_separate_lesions_matching_annotations(dataset):
    root, _, _, annotations = dataset
    assert Counter(len(a["lesions"]) for a in annotations.values()).keys() == {0, 1, 2, 3}
    for image_id, ann in annotations.items():
        labels = np.asarray(Image.open(root / "masks" / f"{image_id}.png"))
        comps = _components(labels > 0)
        k = len(ann["lesions"])
        assert k <= 3 and len(comps) == k
        assert sorted(np.unique(labels).tolist()) == list(range(k + 1))
        quadrants = [les["quadrant"] for les in ann["lesions"]]
        assert quadrants == sorted(set(quadrants), key=QUADRANTS.index)
        for attribute, values in (("shape", SHAPES), ("size", SIZES), ("contrast", CONTRASTS)):
            seen = [les[attribute] for les in ann["lesions"]]
            assert len(set(seen)) == min(k, len(values))   # different values while there are enough
        for les in ann["lesions"]:
            points = np.argwhere(labels == les["label"])
            assert len(_components(labels == les["label"])) == 1
            assert _quadrant(points, labels.shape[0]) == les["quadrant"] and les["side"] == les["quadrant"].split()[0]
            assert les["area"] == len(points)
            single = np.asarray(Image.open(root / les["mask"]))
            assert np.array_equal(single > 0, labels == les["label"])   # the label mask itself when k == 1


def test_attribute_geometry_sizes_by_area_and_elongation_by_shape(dataset):
    root, _, _, annotations = dataset
    lesions = [(iid, les) for iid, ann in annotations.items() for les in ann["lesions"]]
    areas = {s: [les["area"] for _, les in lesions if les["size"] == s] for s in SIZES}
    assert max(areas["small"]) < min(areas["medium"]) and max(areas["medium"]) < min(areas["large"])

    def elongation(les, image_id):
        labels = np.asarray(Image.open(root / "masks" / f"{image_id}.png"))
        pts = np.argwhere(labels == les["label"]).astype(float)
        ev = np.linalg.eigvalsh(np.cov(pts.T) + 1e-3 * np.eye(2))
        return float(np.sqrt(ev[1] / ev[0]))

    ratio = {s: np.mean([elongation(les, iid) for iid, les in lesions if les["shape"] == s]) for s in SHAPES}
    assert ratio["round"] < 1.3 < 2.0 < ratio["elongated"]


def test_lesions_are_visible_in_the_image(dataset):
    root, _, _, annotations = dataset
    for image_id, ann in annotations.items():
        gray = np.asarray(Image.open(root / "images" / f"{image_id}.png"), dtype=float)
        assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 0], gray[..., 2])
        labels = np.asarray(Image.open(root / "masks" / f"{image_id}.png"))
        for les in ann["lesions"]:
            inside = gray[..., 0][labels == les["label"]].mean()
            x0, y0, x1, y1 = les["bbox"]
            ring = gray[max(0, y0 - 4):y1 + 4, max(0, x0 - 4):x1 + 4, 0]
            ring_mask = labels[max(0, y0 - 4):y1 + 4, max(0, x0 - 4):x1 + 4] == 0
            assert inside > ring[ring_mask].mean() + (8 if les["contrast"] == "faint" else 25)


def test_ensure_reuses_a_matching_tree_and_regenerates_otherwise(tmp_path):
    params = {"n_train": 4, "n_val": 2, "n_test": 2, "progress": False, "workers": 1}
    first = ensure_synthmed(tmp_path / "d", seed=3, **params)
    marker = tmp_path / "d" / "images" / "train-00000.png"
    mtime = marker.stat().st_mtime_ns
    assert ensure_synthmed(tmp_path / "d", seed=3, **params)["tree_sha256"] == first["tree_sha256"]
    assert marker.stat().st_mtime_ns == mtime
    marker.write_bytes(b"tampered")                        # hash mismatch -> regenerated
    again = ensure_synthmed(tmp_path / "d", seed=3, **params)
    assert again["tree_sha256"] == first["tree_sha256"] and marker.read_bytes() != b"tampered"
    other = ensure_synthmed(tmp_path / "d", seed=4, **params)
    assert other["seed"] == 4 and other["tree_sha256"] != first["tree_sha256"]
    fewer = ensure_synthmed(tmp_path / "d", seed=4, task_train_images=1, **params)
    assert fewer["task_train_images"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]    # no temporary leftovers


def test_refuses_to_replace_a_foreign_directory_and_bad_arguments(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        generate_synthmed(tmp_path / "mine", n_train=1, n_val=0, n_test=0, progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError):
        generate_synthmed(tmp_path / "x", image_size=16, progress=False)
    with pytest.raises(ValueError):
        generate_synthmed(tmp_path / "x", seed=-1, progress=False)
    with pytest.raises(ValueError):
        generate_synthmed(tmp_path / "x", n_train=-5, progress=False)
    with pytest.raises(ValueError, match="task_train_images"):
        generate_synthmed(tmp_path / "x", task_train_images=-1, progress=False)
