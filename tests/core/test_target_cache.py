"""Tests for the shared on-disk teacher-target cache (medalign_platform.core.target_cache)."""

from __future__ import annotations

import json
import re
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from medalign_platform.core.target_cache import TargetCache, image_content_hash
from medalign_platform.core.teacher import load_teacher
from medalign_platform.synthmed.tiny_teacher import tiny_teacher

N_IMAGES = 4


class CountingTeacher:
    """Wraps a teacher and counts the images it actually encodes."""

    def __init__(self, teacher):
        self.inner = teacher
        self.identity, self.grid, self.width = teacher.identity, teacher.grid, teacher.width
        self.calls = 0
        self.images = 0

    def encode_images(self, images, batch_size=None):
        self.calls += 1
        self.images += len(images)
        return self.inner.encode_images(images, batch_size)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return load_teacher("local-dir:" + str(tiny_teacher(tmp_path_factory.mktemp("t0"))))


@pytest.fixture(scope="module")
def other_teacher(tmp_path_factory):
    directory = tiny_teacher(tmp_path_factory.mktemp("t1"), seed=1)
    return load_teacher("local-dir:" + str(directory))


@pytest.fixture(scope="module")
def image_paths(tmp_path_factory):
    directory = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(N_IMAGES + 2):
        path = directory / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (40 + i, 56, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def reference(teacher, image_paths):
    """Direct (uncached) teacher outputs for the first N_IMAGES images."""
    return teacher.encode_images([Image.open(p) for p in image_paths[:N_IMAGES]])


def _fp16_close(stored, exact):
    """Equal up to fp16 rounding (half an ulp, |x| * 2**-11) plus CPU batch jitter."""
    return bool(((stored - exact).abs() <= exact.abs() * 2**-11 + 1e-6).all())


def _shards(root: Path) -> list[Path]:
    return sorted(root.glob("*/shard-*.safetensors"))


def _tensor_span(shard: Path, name: str) -> tuple[int, int]:
    """Absolute byte range of one tensor inside a safetensors file."""
    raw = shard.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    begin, end = json.loads(raw[8:8 + header_len])[name]["data_offsets"]
    return 8 + header_len + begin, 8 + header_len + end


def test_first_call_misses_and_matches_teacher(tmp_path, teacher, image_paths, reference):
    cache, counting = TargetCache(tmp_path), CountingTeacher(teacher)
    out = cache.get_or_compute(counting, image_paths[:N_IMAGES], batch_size=3)
    assert (cache.stats.hits, cache.stats.misses, cache.stats.corrupt) == (0, N_IMAGES, 0)
    assert counting.calls == 2 and counting.images == N_IMAGES  # batches of 3 + 1
    assert out.grid == (8, 8) and out.patch_tokens.shape == (N_IMAGES, 64, 64)
    assert out.patch_tokens.dtype == torch.float32
    # Stored as fp16; returned values are the fp16-rounded teacher outputs.
    assert torch.equal(out.patch_tokens, out.patch_tokens.half().float())
    assert _fp16_close(out.patch_tokens, reference.patch_tokens)
    assert torch.allclose(out.cls_attention, reference.cls_attention, atol=1e-6, rtol=0)
    assert len(_shards(tmp_path)) == 1
    assert _shards(tmp_path)[0].parent.name == teacher.identity[:16]


def test_second_cache_object_hits_without_teacher_forward(tmp_path, teacher, image_paths):
    first = TargetCache(tmp_path).get_or_compute(teacher, image_paths[:N_IMAGES])
    cache, counting = TargetCache(tmp_path), CountingTeacher(teacher)  # another trial
    again = cache.get_or_compute(counting, image_paths[:N_IMAGES])
    assert counting.calls == 0
    assert (cache.stats.hits, cache.stats.misses) == (N_IMAGES, 0)
    assert torch.equal(again.patch_tokens, first.patch_tokens)
    assert torch.equal(again.cls_attention, first.cls_attention)
    assert len(_shards(tmp_path)) == 1


def test_only_missing_entries_are_computed_in_input_order(tmp_path, teacher, image_paths,
                                                          reference):
    cache = TargetCache(tmp_path)
    cache.get_or_compute(teacher, image_paths[:2])
    counting = CountingTeacher(teacher)
    order = [image_paths[3], image_paths[0], image_paths[2], image_paths[0], image_paths[1]]
    out = cache.get_or_compute(counting, order)
    assert counting.images == 2  # images 2 and 3; the repeated image 0 is a hit
    assert (cache.stats.hits, cache.stats.misses) == (2, 4)
    expected = reference.cls_attention[[3, 0, 2, 0, 1]]
    assert torch.allclose(out.cls_attention, expected, atol=1e-6, rtol=0)
    assert len(_shards(tmp_path)) == 2  # one new shard per call with misses


def test_pil_images_bytes_and_explicit_keys(tmp_path, teacher, image_paths, reference):
    cache = TargetCache(tmp_path)
    pil = [Image.open(p).convert("RGB") for p in image_paths[:2]]
    from_pil = cache.get_or_compute(teacher, pil)
    assert torch.allclose(from_pil.cls_attention, reference.cls_attention[:2], atol=1e-6, rtol=0)
    raw = [p.read_bytes() for p in image_paths[:2]]
    cache.get_or_compute(teacher, raw)  # bytes hash like their file: entries shared
    counting = CountingTeacher(teacher)
    keys = [image_content_hash(p) for p in image_paths[:2]]
    out = cache.get_or_compute(counting, image_paths[:2], keys=keys)
    assert counting.calls == 0 and torch.equal(out.cls_attention, from_pil.cls_attention)
    with pytest.raises(ValueError, match="keys has 1 items"):
        cache.get_or_compute(teacher, image_paths[:2], keys=keys[:1])


def test_different_teacher_misses(tmp_path, teacher, other_teacher, image_paths):
    TargetCache(tmp_path).get_or_compute(teacher, image_paths[:2])
    cache, counting = TargetCache(tmp_path), CountingTeacher(other_teacher)
    out = cache.get_or_compute(counting, image_paths[:2])
    assert counting.images == 2 and cache.stats.hits == 0
    direct = other_teacher.encode_images([Image.open(p) for p in image_paths[:2]])
    assert torch.allclose(out.cls_attention, direct.cls_attention, atol=1e-6, rtol=0)
    assert len({p.parent for p in _shards(tmp_path)}) == 2


def test_flipped_bytes_are_detected_and_recomputed(tmp_path, teacher, image_paths, reference):
    cache = TargetCache(tmp_path)
    cache.get_or_compute(teacher, image_paths[:N_IMAGES])
    (shard,) = _shards(tmp_path)
    key = cache.entry_key(teacher, image_content_hash(image_paths[1]))
    begin, end = _tensor_span(shard, f"{key}/patch_tokens")
    raw = bytearray(shard.read_bytes())
    raw[begin + (end - begin) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))

    fresh, counting = TargetCache(tmp_path), CountingTeacher(teacher)
    with pytest.warns(RuntimeWarning, match="corrupt entry"):
        out = fresh.get_or_compute(counting, image_paths[:N_IMAGES])
    assert (fresh.stats.corrupt, fresh.stats.misses, fresh.stats.hits) == (1, 1, N_IMAGES - 1)
    assert counting.images == 1
    assert _fp16_close(out.patch_tokens, reference.patch_tokens)
    assert torch.allclose(out.cls_attention, reference.cls_attention, atol=1e-6, rtol=0)

    # The rewrite supersedes the bad copy for everyone else.
    later, counting = TargetCache(tmp_path), CountingTeacher(teacher)
    again = later.get_or_compute(counting, image_paths[:N_IMAGES])
    assert counting.calls == 0 and later.stats.corrupt == 0
    assert torch.equal(again.patch_tokens, out.patch_tokens)


def test_truncated_shard_is_moved_aside_and_recomputed(tmp_path, teacher, image_paths,
                                                       reference):
    TargetCache(tmp_path).get_or_compute(teacher, image_paths[:N_IMAGES])
    (shard,) = _shards(tmp_path)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])

    cache, counting = TargetCache(tmp_path), CountingTeacher(teacher)
    with pytest.warns(RuntimeWarning, match="unreadable shard"):
        out = cache.get_or_compute(counting, image_paths[:N_IMAGES])
    assert (cache.stats.corrupt, cache.stats.moved_aside, cache.stats.misses) == (1, 1, N_IMAGES)
    assert counting.images == N_IMAGES
    assert not shard.exists()
    assert shard.with_name(shard.name + ".corrupt").exists()  # kept, not deleted
    assert torch.allclose(out.cls_attention, reference.cls_attention, atol=1e-6, rtol=0)
    assert _fp16_close(out.patch_tokens, reference.patch_tokens)


def test_patch_tokens_are_stored_as_fp16(tmp_path, teacher, image_paths):
    cache = TargetCache(tmp_path)
    cache.get_or_compute(teacher, image_paths[:2])
    (shard,) = _shards(tmp_path)
    key = cache.entry_key(teacher, image_content_hash(image_paths[0]))
    h, w = teacher.grid
    with safe_open(str(shard), framework="pt") as f:
        record = json.loads(f.metadata()[key])
        assert f.get_slice(f"{key}/patch_tokens").get_dtype() == "F16"
        assert f.get_slice(f"{key}/cls_attention").get_dtype() == "F32"
    begin, end = _tensor_span(shard, f"{key}/patch_tokens")
    assert end - begin == h * w * teacher.width * 2
    assert record["grid"] == [h, w] and record["width"] == teacher.width
    assert len(record["sha256"]) == 64


def test_concurrent_writer_shards_are_picked_up(tmp_path, teacher, image_paths):
    reader = TargetCache(tmp_path)
    reader.refresh(teacher)  # indexed while the directory was still empty
    TargetCache(tmp_path).get_or_compute(teacher, image_paths[:2])  # another process
    (tmp_path / teacher.identity[:16] / ".tmp-crashed.partial").write_bytes(b"garbage")
    counting = CountingTeacher(teacher)
    reader.get_or_compute(counting, image_paths[:2])
    assert counting.calls == 0 and reader.stats.hits == 2 and reader.stats.corrupt == 0


def test_concurrent_trials_share_one_root(tmp_path, teacher, image_paths, reference):
    caches = [TargetCache(tmp_path) for _ in range(3)]
    with ThreadPoolExecutor(len(caches)) as pool:  # one shared teacher, parallel trials
        outs = list(pool.map(lambda c: c.get_or_compute(teacher, image_paths[:N_IMAGES]), caches))
    for out in outs:
        assert _fp16_close(out.patch_tokens, reference.patch_tokens)
        assert torch.allclose(out.cls_attention, reference.cls_attention, atol=1e-6, rtol=0)
    assert not list(tmp_path.glob("*/.tmp-*"))
    final, counting = TargetCache(tmp_path), CountingTeacher(teacher)
    final.get_or_compute(counting, image_paths[:N_IMAGES])
    assert counting.calls == 0 and final.stats.corrupt == 0


def test_image_content_hash(tmp_path, image_paths):
    path = image_paths[0]
    assert image_content_hash(path) == image_content_hash(str(path))
    assert image_content_hash(path) == image_content_hash(path.read_bytes())
    image = Image.open(path).convert("RGB")
    assert image_content_hash(image) == image_content_hash(image.copy())
    changed = image.copy()
    changed.putpixel((0, 0), (1, 2, 3) if image.getpixel((0, 0)) != (1, 2, 3) else (4, 5, 6))
    assert image_content_hash(changed) != image_content_hash(image)
    assert image_content_hash(image.convert("L")) != image_content_hash(image)
    with pytest.raises(TypeError):
        image_content_hash(42)


def test_no_pickle_in_platform_sources():
    root = Path(__file__).resolve().parents[2] / "platform"
    pattern = re.compile(
        r"^\s*(import|from)\s+(c?pickle|dill|cloudpickle)\b|\b(c?pickle|dill|cloudpickle)\.\w",
        re.MULTILINE)
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if pattern.search(p.read_text(encoding="utf-8"))]
    assert offenders == []
