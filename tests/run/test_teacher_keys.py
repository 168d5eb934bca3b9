"""Teacher keys recorded beside the target cache: a second process reads cached targets
without loading (or even importing) the teacher, and any change to its files loads it again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medalign_platform.run.settings import TeacherSettings
from medalign_platform.run.teacher_keys import KEYS_FILE, signature, teacher_files
from medalign_platform.synthmed.tiny_teacher import tiny_teacher

ROOT = Path(__file__).resolve().parents[2]
# A fresh process: builds the lookup, reads one image's targets, and says whether open_clip was imported.
SECOND_PROCESS = """
import json, sys
from medalign_platform.run.evaluation import TargetLookup
from medalign_platform.run.settings import TeacherSettings
lookup = TargetLookup(TeacherSettings.from_dict(json.loads(sys.argv[1])))
lookup([sys.argv[2]])
print(json.dumps({"identity": lookup.identity, "open_clip": "open_clip" in sys.modules,
                  "hits": lookup.cache.stats.hits, "misses": lookup.cache.stats.misses}))
"""


@pytest.fixture()
def teacher(tmp_path) -> tuple[dict, Path]:
    """A tiny local-dir teacher, its settings and one image."""
    from PIL import Image

    folder = tiny_teacher(tmp_path / "teacher", image_size=64, patch_size=16)
    image = tmp_path / "image.png"
    Image.new("RGB", (64, 64), (90, 40, 200)).save(image)
    section = {"name": f"local-dir:{folder}", "cache_dir": str(tmp_path / "cache"), "attention": "cls"}
    return section, image


def _second_process(section: dict, image: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "platform")}
    done = subprocess.run([sys.executable, "-c", SECOND_PROCESS, json.dumps(section), str(image)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_second_process_reads_the_cache_without_loading_the_teacher(teacher):
    from medalign_platform.run.evaluation import precompute_targets, TargetLookup

    section, image = teacher
    settings = TeacherSettings.from_dict(section)
    first = TargetLookup(settings)  # loads the teacher and records its key
    first([str(image)])
    assert first.cache.stats.misses == 1
    recorded = json.loads((Path(section["cache_dir"]) / KEYS_FILE).read_text())
    assert list(recorded.values()) == [first.key.fields()]

    second = _second_process(section, image)
    assert second["identity"] == first.identity
    assert second["open_clip"] is False  # neither loaded nor imported
    assert (second["hits"], second["misses"]) == (1, 0)

    assert TargetLookup(settings)._model is None  # here too: built from the record

    # A changed teacher file (same size, new time) is a new signature: loaded again, same key.
    config = Path(section["name"].removeprefix("local-dir:")) / "open_clip_config.json"
    os.utime(config, ns=(config.stat().st_atime_ns, config.stat().st_mtime_ns + 1_000_000_000))
    third = TargetLookup(settings)
    assert third._model is not None and third.identity == first.identity
    assert len(json.loads((Path(section["cache_dir"]) / KEYS_FILE).read_text())) == 2

    # The driver's precompute over a warm cache: all hits, with the recorded key.
    assert precompute_targets(settings, _Items([str(image)])) == {"images": 1, "hits": 1, "misses": 0, "corrupt": 0}


def test_a_missing_entry_still_loads_the_teacher_and_checks_its_fingerprint(teacher, tmp_path):
    from medalign_platform.common.errors import MedAlignError
    from medalign_platform.run.evaluation import TargetLookup

    section, image = teacher
    settings = TeacherSettings.from_dict(section)
    TargetLookup(settings)  # records the key, computes nothing
    other = tmp_path / "other.png"
    from PIL import Image

    Image.new("RGB", (64, 64), (10, 200, 30)).save(other)
    lookup = TargetLookup(settings)
    assert lookup._model is None  # built from the recorded key
    lookup([str(other)])  # a miss: the teacher is loaded now, and its fingerprint matches
    assert lookup.cache.stats.misses == 1 and lookup._model is not None

    # A record that does not match the files (edited by hand): the load on a miss refuses it.
    path = Path(section["cache_dir"]) / KEYS_FILE
    records = json.loads(path.read_text())
    path.write_text(json.dumps({sig: {**fields, "identity": "0" * 64} for sig, fields in records.items()}))
    with pytest.raises(MedAlignError, match="is not the teacher the run was keyed on"):
        TargetLookup(settings)([str(image)])


def test_only_teachers_made_of_local_files_are_recorded(tmp_path):
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(b"x")
    assert teacher_files("hf-hub:microsoft/BiomedCLIP", None) is None
    assert teacher_files("ViT-B-16", "openai") is None  # an open_clip tag
    assert teacher_files("ViT-B-16", str(weights)) == [weights]
    assert teacher_files(f"local-dir:{tmp_path / 'absent'}", None) is None
    assert signature("ViT-B-16", None) is None
    a = signature("ViT-B-16", str(weights))
    assert a and a != signature("ViT-L-14", str(weights))  # the architecture is part of it
    factory = "package.module:build"
    assert signature("ViT-B-16", str(weights), factory) not in (None, a)   # another builder, another key
    assert signature("ViT-B-16", str(weights), None) == a
    weights.write_bytes(b"xy")
    assert signature("ViT-B-16", str(weights)) != a


class _Items:
    """The two methods of SplitItems that precompute_targets reads (cls mode: image paths)."""

    def __init__(self, paths: list[str]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def image_path(self, i: int) -> str:
        return self.paths[i]
