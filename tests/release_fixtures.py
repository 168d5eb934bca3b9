"""Tiny copies of the public releases, in each release's exact on-disk layout.

Every writer puts a handful of records and small real image files where the release puts
them (file names, folder names, field names and value types as published), so the
adapters are tested on the same layout a researcher unpacks. See docs/datasets.md.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image


def write_image(path: Path, seed: int, size=(24, 20), fmt: str | None = None) -> Path:
    """A small noise image (distinct per seed), in the format the suffix says."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, format=fmt)
    return path


def image_bytes(seed: int, fmt: str = "JPEG", size=(24, 20)) -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


# --------------------------------------------------------------------------- VQA-RAD (OSF)

VQA_RAD_JSON = "VQA_RAD Dataset Public.json"
VQA_RAD_IMAGES = "VQA_RAD Image Folder"


def vqa_rad_record(qid, image, question, answer, answer_type, phrase_type, question_type="PRES", **extra) -> dict:
    """One record with every field of the OSF JSON (values typed as published: qid an int)."""
    return {
        "qid": qid, "phrase_type": phrase_type, "qid_linked_id": f"0{qid}2018", "image_case_url":
        f"https://medpix.nlm.nih.gov/case?id={qid}", "image_name": image, "image_organ": "CHEST",
        "evaluation": "not evaluated", "question": question, "question_rephrase": "NULL",
        "question_relation": "NULL", "question_frame": "NULL", "question_type": question_type,
        "answer": answer, "answer_type": answer_type, **extra,
    }


def vqa_rad_records() -> list[dict]:
    """10 records on 5 images: 7 train (freeform/para), 3 test; synpic1 is in both splits."""
    return [
        vqa_rad_record(1, "synpic1.jpg", "Is there a pneumothorax?", "No", "CLOSED", "freeform"),
        vqa_rad_record(2, "synpic1.jpg", "Is a pneumothorax present?", "No", "CLOSED", "para"),
        vqa_rad_record(3, "synpic1.jpg", "How many ribs are fractured?", 2, "OPEN", "freeform", "COUNT"),
        vqa_rad_record(4, "synpic2.jpg", "What organ is shown?", "the liver", "open", "freeform", "ORGAN"),
        vqa_rad_record(5, "synpic3.jpg", "Is the mass on the left?", "yes", "Closed", "freeform", "POS"),
        vqa_rad_record(6, "synpic4.jpg", "What imaging modality is this?", "CT", "OPEN", "freeform", "MODALITY"),
        vqa_rad_record(7, "synpic4.jpg", "What modality was used?", "CT", "OPEN", "para", "MODALITY"),
        vqa_rad_record(8, "synpic1.jpg", "Is there a pneumothorax?", "no", "CLOSED", "test_freeform"),
        vqa_rad_record(9, "synpic5.jpg", "Where is the lesion?", "right lower lobe", "OPEN", "test_freeform", "POS"),
        vqa_rad_record(10, "synpic5.jpg", "Is the heart enlarged?", "yes", "CLOSED", "test_para", "SIZE, PRES"),
    ]


def write_vqa_rad(root: Path, records: list[dict] | None = None, images: range = range(1, 6)) -> Path:
    """The OSF release: the JSON list beside ``VQA_RAD Image Folder/synpicN.jpg``."""
    root.mkdir(parents=True, exist_ok=True)
    for n in images:
        write_image(root / VQA_RAD_IMAGES / f"synpic{n}.jpg", seed=n)
    (root / VQA_RAD_JSON).write_text(json.dumps(vqa_rad_records() if records is None else records, indent=1))
    return root


# --------------------------------------------------------------------------- SLAKE


def slake_record(qid, img_id, question, answer, answer_type="CLOSED", q_lang="en", content_type="Organ", **extra):
    return {
        "img_id": img_id, "img_name": f"xmlab{img_id}/source.jpg", "question": question, "answer": answer,
        "q_lang": q_lang, "location": "Lung", "modality": "CT", "answer_type": answer_type,
        "base_type": "vqa", "content_type": content_type, "triple": ["vhead", "_", "_"], "qid": qid, **extra,
    }


def slake_splits() -> dict[str, list[dict]]:
    """train 4 en + 2 zh, validate 2 en + 1 zh, test 2 en + 1 zh; xmlab1..xmlab4."""
    return {
        "train.json": [
            slake_record(1, 1, "Is this a CT image?", "Yes", "CLOSED", content_type="Modality"),
            slake_record(2, 1, "Which organ is abnormal?", "Lung", "OPEN", content_type="Abnormality"),
            slake_record(3, 1, "这是CT图像吗?", "是", "CLOSED", q_lang="zh", content_type="Modality"),
            slake_record(4, 2, "Where is the liver?", "Left", "OPEN", content_type="Position"),
            slake_record(5, 2, "Does the picture contain the heart?", "No", "CLOSED"),
            slake_record(6, 2, "图中有心脏吗?", "否", "CLOSED", q_lang="zh"),
        ],
        "validate.json": [
            slake_record(7, 3, "What modality is used?", "MRI", "OPEN", content_type="Modality"),
            slake_record(8, 3, "Is the lung healthy?", "No", "CLOSED", content_type="Abnormality"),
            slake_record(9, 3, "肺健康吗?", "不", "CLOSED", q_lang="zh"),
        ],
        "test.json": [
            slake_record(10, 4, "How many kidneys are there?", "2", "OPEN", content_type="Quantity"),
            slake_record(11, 4, "Is this a chest scan?", "Yes", "CLOSED", content_type="Position"),
            slake_record(12, 4, "有几个肾?", "2", "OPEN", q_lang="zh"),
        ],
    }


def write_slake(root: Path, splits: dict | None = None, masks: bool = True, image_ids=range(1, 5),
                mask_box=(4, 4, 12, 10)) -> Path:
    """``train.json``, ``validate.json``, ``test.json`` + ``imgs/xmlabN/{source.jpg, mask.png, ...}``."""
    root.mkdir(parents=True, exist_ok=True)
    for n in image_ids:
        folder = root / "imgs" / f"xmlab{n}"
        write_image(folder / "source.jpg", seed=100 + n)
        if masks:
            mask = np.zeros((20, 24), dtype=np.uint8)
            x0, y0, x1, y1 = mask_box
            mask[y0:y1, x0:x1] = 255
            Image.fromarray(mask).save(folder / "mask.png")
        (folder / "detection.json").write_text(json.dumps([{"Lung": [4, 4, 8, 6]}]))
        (folder / "question.json").write_text("[]")
    for name, records in (slake_splits() if splits is None else splits).items():
        (root / name).write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    return root


# --------------------------------------------------------------------------- parquet mirrors


def write_parquet_mirror(root: Path, splits: dict[str, list[tuple]], file_names: dict[str, str] | None = None,
                         extra_columns: dict[str, dict[str, list]] | None = None) -> Path:
    """A mirror as the hub stores it: ``data/<split>-00000-of-00001.parquet`` with an ``image``
    column of the ``datasets`` Image type (``{bytes, path}``), ``question``, ``answer``.

    ``splits[split]`` is a list of ``(image bytes, question, answer)``.
    """
    import datasets

    for split, rows in splits.items():
        columns = {"image": [{"bytes": b, "path": None} for b, _, _ in rows],
                   "question": [q for _, q, _ in rows], "answer": [a for _, _, a in rows]}
        features = {"image": datasets.Image(), "question": datasets.Value("string"),
                    "answer": datasets.Value("string")}
        for column, values in ((extra_columns or {}).get(split) or {}).items():
            columns[column] = values
            features[column] = datasets.Value("string")
        dataset = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
        name = (file_names or {}).get(split, f"data/{split}-00000-of-00001.parquet")
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        dataset.to_parquet(str(root / name))
    return root


def pathvqa_rows() -> dict[str, list[tuple]]:
    """train 4 (one image twice), validation 2, test 3 (one image also in train)."""
    return {
        "train": [(image_bytes(1), "Is there inflammation?", "yes"), (image_bytes(1), "What is shown?", "fibrosis"),
                  (image_bytes(2, "PNG"), "Are the cells necrotic?", "no"),
                  (image_bytes(3), "What stain is used?", "hematoxylin and eosin")],
        "validation": [(image_bytes(4), "Is this benign?", "Yes"), (image_bytes(5), "What organ is this?", "liver")],
        "test": [(image_bytes(1), "Is there inflammation?", "yes"), (image_bytes(6), "Is there a tumor?", "no"),
                 (image_bytes(7), "Where are the nuclei?", "at the periphery")],
    }


# --------------------------------------------------------------------------- R2Gen (IU-Xray, MIMIC-CXR)


def iu_xray_annotation() -> dict:
    def study(n, split, report):
        return {"id": f"CXR{n}_IM-{n:04d}", "report": report,
                "image_path": [f"CXR{n}_IM-{n:04d}/0.png", f"CXR{n}_IM-{n:04d}/1.png"], "split": split}

    return {
        "train": [study(1, "train", "The heart is normal in size. The lungs are clear."),
                  study(2, "train", "Mild cardiomegaly. No pleural effusion."),
                  study(3, "train", "No acute cardiopulmonary abnormality.")],
        "val": [study(4, "val", "Lungs are clear bilaterally.")],
        "test": [study(5, "test", "Heart size is within normal limits. No pneumothorax."),
                 study(6, "test", "Degenerative changes of the spine.")],
    }


def mimic_annotation() -> dict:
    def study(subject, study_id, split, report, views=1):
        folder = f"p{str(subject)[:2]}/p{subject}/s{study_id}"
        return {"id": f"{study_id}-dicom", "study_id": study_id, "subject_id": subject, "report": report,
                "image_path": [f"{folder}/{study_id}{v}.jpg" for v in "ab"[:views]], "split": split}

    return {
        "train": [study(10000032, 50414267, "train", "No acute process.", views=2),
                  study(10000033, 50414268, "train", "Small left effusion.")],
        "val": [study(10000034, 50414269, "validate", "Stable cardiomegaly.")],
        "test": [study(10000035, 50414270, "test", "Right lower lobe opacity concerning for pneumonia.")],
    }


def write_r2gen(root: Path, annotation: dict) -> Path:
    """``annotation.json`` beside ``images/`` with every listed view written as a small image."""
    root.mkdir(parents=True, exist_ok=True)
    seed = 0
    for records in annotation.values():
        for record in records:
            for rel in record.get("image_path") or []:
                seed += 1
                target = root / "images" / rel
                if not target.exists():
                    write_image(target, seed=500 + seed)
    (root / "annotation.json").write_text(json.dumps(annotation, indent=1))
    return root


# --------------------------------------------------------------------------- LLaVA conversation JSON


def conversation(rid, image, question, answer, answer_type=None, **extra) -> dict:
    record = {"id": rid, "image": image, "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                                           {"from": "gpt", "value": answer}], **extra}
    if answer_type is not None:
        record["answer_type"] = answer_type
    return record


def write_llava_json(root: Path) -> Path:
    """``train.json`` + ``test.json`` in the original work's format (``answer_type`` OPEN/CLOSED)."""
    root.mkdir(parents=True, exist_ok=True)
    for n in range(1, 5):
        write_image(root / "images" / f"img{n}.jpg", seed=900 + n)
    train = [conversation("q1", "images/img1.jpg", "Is there an effusion?", "yes", "CLOSED"),
             conversation("q2", "images/img1.jpg", "What is abnormal?", "the left lung", "OPEN"),
             conversation("q3", "images/img2.jpg", "Is the heart enlarged?", "no", "Closed"),
             conversation("q4", "images/img3.jpg", "Which side?", "right")]
    test = [conversation("t1", "images/img4.jpg", "Is this an MRI?", "no", "CLOSED"),
            conversation("t2", "images/img4.jpg", "What organ?", "brain", "OPEN")]
    (root / "train.json").write_text(json.dumps(train))
    (root / "test.json").write_text(json.dumps(test))
    return root
