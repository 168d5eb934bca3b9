"""SynthMed generator: determinism, agreement of every answer with the masks, format."""

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
    tree_sha256,
)

SMALL = {"n_train": 40, "n_val": 10, "n_test": 10, "image_size": 64, "progress": False}
COUNT_WORDS = ["zero", "one", "two"]


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
    root = generated[0] / "a"
    records = {split: json.loads((root / f"{split}.json").read_text()) for split in ("train", "val", "test")}
    annotations = {ann["id"]: ann for split in ("train", "val", "test")
                   for ann in json.loads((root / "annotations" / f"{split}.json").read_text())}
    return root, records, annotations


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


def test_manifest(generated):
    base, a, _, _ = generated
    manifest = load_manifest(base / "a")
    assert manifest["version"] == SYNTHMED_VERSION and manifest["seed"] == 0
    assert manifest["sizes"] == {"train": 40, "val": 10, "test": 10}
    for split, n in manifest["sizes"].items():
        assert manifest["splits"][split]["images"] == n
        assert manifest["splits"][split]["records"] == len(json.loads((base / "a" / f"{split}.json").read_text()))
    for rel, digest in manifest["files"].items():
        assert hashlib.sha256((base / "a" / rel).read_bytes()).hexdigest() == digest
    assert len(list((base / "a" / "images").glob("*.png"))) == 60 == len(list((base / "a" / "masks").glob("*.png")))


def test_records_follow_the_llava_conversation_format(dataset):
    root, records, _ = dataset
    ids = set()
    for split, recs in records.items():
        image_ids = {r["image_id"] for r in recs}
        assert len(image_ids) == {"train": 40, "val": 10, "test": 10}[split]
        for r in recs:
            assert set(r) == {"id", "image_id", "image", "mask", "conversations", "answer_type", "question_type"}
            assert r["id"] not in ids
            ids.add(r["id"])
            assert r["image"] == f"images/{r['image_id']}.png" and (root / r["image"]).is_file()
            assert r["mask"] == f"masks/{r['image_id']}.png" and (root / r["mask"]).is_file()
            human, gpt = r["conversations"]
            assert human["from"] == "human" and human["value"].startswith("<image>\n")
            assert gpt["from"] == "gpt" and gpt["value"]
            assert r["answer_type"] in {"closed", "open", "report"}
            assert r["question_type"] in {"presence", "side", "quadrant", "shape", "size", "contrast", "count", "report"}
            assert (r["answer_type"] == "report") == (r["question_type"] == "report")
        counts = Counter(r["image_id"] for r in recs if r["answer_type"] == "report")
        assert set(counts.values()) == {1}
    with Image.open(root / records["train"][0]["image"]) as im:
        assert im.mode == "RGB" and im.size == (64, 64)
    with Image.open(root / records["train"][0]["mask"]) as im:
        assert im.mode == "L" and im.size == (64, 64)


def test_all_text_uses_the_small_vocabulary(dataset):
    _, records, _ = dataset
    assert SYNTHMED_WORDS == sorted(set(SYNTHMED_WORDS)) and all(w.isalpha() and w.islower() for w in SYNTHMED_WORDS)
    allowed = set(SYNTHMED_WORDS) | set(SYNTHMED_PUNCTUATION)
    used = Counter()
    for recs in records.values():
        for r in recs:
            for text in (r["conversations"][0]["value"].removeprefix("<image>\n"), r["conversations"][1]["value"]):
                assert text == text.strip() and "  " not in text
                tokens = re.findall(r"[a-z]+|\S", text)
                assert set(tokens) <= allowed, (text, set(tokens) - allowed)
                used.update(t for t in tokens if t.isalpha())
    assert len(set(used)) >= 0.9 * len(SYNTHMED_WORDS)


def test_closed_answers_are_yes_no_and_balanced(dataset):
    _, records, _ = dataset
    closed = [r["conversations"][1]["value"] for recs in records.values() for r in recs if r["answer_type"] == "closed"]
    assert len(closed) >= 300
    assert set(closed) == {"yes", "no"}
    assert 0.35 <= closed.count("yes") / len(closed) <= 0.65
    for recs in records.values():
        for r in recs:
            if r["answer_type"] != "closed":
                assert r["conversations"][1]["value"] not in {"yes", "no"}


def test_every_answer_agrees_with_the_mask(dataset):
    root, records, annotations = dataset
    truths = {}
    for recs in records.values():
        for r in recs:
            image_id = r["image_id"]
            if image_id not in truths:
                truths[image_id] = _truth(root, image_id)
            t = truths[image_id]
            k = len(t["components"])
            question = r["conversations"][0]["value"].removeprefix("<image>\n")
            answer = r["conversations"][1]["value"]
            qtype, atype = r["question_type"], r["answer_type"]
            if qtype == "presence":
                lesion = question == "is there a lesion?"
                assert lesion or question == "is this a normal study?"
                assert answer == ("yes" if (k > 0) == lesion else "no")
            elif qtype == "count":
                assert answer == COUNT_WORDS[k]
            elif qtype == "quadrant" and atype == "closed":
                quadrant = re.fullmatch(r"is there a lesion in the (\w+ \w+) quadrant\?", question).group(1)
                assert answer == ("yes" if quadrant in t["quadrants"] else "no")
            elif qtype == "quadrant":
                assert k > 0 and answer == " and ".join(f"{q} quadrant" for q in t["quadrants"])
            elif qtype == "side" and atype == "closed":
                side = re.fullmatch(r"is there a lesion on the (\w+) side\?", question).group(1)
                assert answer == ("yes" if side in t["sides"] else "no")
            elif qtype == "side":
                assert k > 0 and answer == ("both" if len(t["sides"]) == 2 else next(iter(t["sides"])))
            elif qtype == "report":
                if k == 0:
                    assert answer == "no lesion. normal study."
                else:
                    assert answer.startswith(f"{COUNT_WORDS[k]} lesion")
                    assert re.findall(r"in the (\w+ \w+) quadrant", answer) == t["quadrants"]


def test_masks_hold_zero_to_two_separate_lesions_matching_annotations(dataset):
    root, records, annotations = dataset
    assert Counter(len(a["lesions"]) for a in annotations.values()).keys() == {0, 1, 2}
    for image_id, ann in annotations.items():
        labels = np.asarray(Image.open(root / "masks" / f"{image_id}.png"))
        comps = _components(labels > 0)
        k = len(ann["lesions"])
        assert k <= 2 and len(comps) == k
        assert sorted(np.unique(labels).tolist()) == list(range(k + 1))
        quadrants = [les["quadrant"] for les in ann["lesions"]]
        assert quadrants == sorted(set(quadrants), key=QUADRANTS.index)
        for les in ann["lesions"]:
            points = np.argwhere(labels == les["label"])
            assert len(_components(labels == les["label"])) == 1
            assert _quadrant(points, labels.shape[0]) == les["quadrant"] and les["side"] == les["quadrant"].split()[0]
            assert les["area"] == len(points)
            assert les["shape"] in SHAPES and les["size"] in SIZES and les["contrast"] in CONTRASTS


def test_attribute_answers_agree_with_annotations_and_mask_geometry(dataset):
    root, records, annotations = dataset
    for recs in records.values():
        for r in recs:
            lesions = annotations[r["image_id"]]["lesions"]
            question = r["conversations"][0]["value"].removeprefix("<image>\n")
            answer = r["conversations"][1]["value"]
            qtype = r["question_type"]
            if qtype in ("shape", "size", "contrast") and r["answer_type"] == "closed":
                value = re.fullmatch(r"is there an? (\w+) lesion\?", question).group(1)
                assert answer == ("yes" if any(les[qtype] == value for les in lesions) else "no")
            elif qtype in ("shape", "size"):
                m = re.fullmatch(rf"what is the {qtype} of the lesion(?: in the (\w+ \w+) quadrant)?\?", question)
                target = [les for les in lesions if m.group(1) in (None, les["quadrant"])]
                assert len(target) == 1 and answer == target[0][qtype]
                assert (m.group(1) is None) == (len(lesions) == 1)
    # size classes are separated by area; elongation orders the shapes
    lesions = [les for ann in annotations.values() for les in ann["lesions"]]
    areas = {s: [les["area"] for les in lesions if les["size"] == s] for s in SIZES}
    assert max(areas["small"]) < min(areas["medium"]) and max(areas["medium"]) < min(areas["large"])

    def elongation(les, image_id):
        labels = np.asarray(Image.open(root / "masks" / f"{image_id}.png"))
        pts = np.argwhere(labels == les["label"]).astype(float)
        ev = np.linalg.eigvalsh(np.cov(pts.T) + 1e-3 * np.eye(2))
        return float(np.sqrt(ev[1] / ev[0]))

    ratio = {s: np.mean([elongation(les, iid) for iid, ann in annotations.items() for les in ann["lesions"]
                         if les["shape"] == s and les["size"] != "small"]) for s in ("round", "oval", "elongated")}
    assert ratio["round"] < ratio["oval"] < ratio["elongated"]


def test_lesions_are_visible_in_the_image(dataset):
    root, _, annotations = dataset
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
