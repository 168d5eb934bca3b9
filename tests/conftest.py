"""Shared fixtures: a tiny LLaVA student saved once per session, and batch builders."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Every Ray node started here (ray.init, `ray start`) skips Ray's prestarted idle workers: one
# Python process per CPU that never runs a task here, since the platform's tasks carry a
# runtime env of their own (benchmarks/ray_cluster_cost.py: within the noise alone, 0.8 s of CPU
# per cluster start without the dashboard).
os.environ.setdefault("RAY_enable_worker_prestart", "0")
os.environ.setdefault("RAY_prestart_worker_first_driver", "0")

# For runs and sweeps on a local cluster of their own whose test reads nothing from Ray's
# dashboard: it is a process tree of its own, ~2.6 s of CPU per start here. The default
# (the dashboard on) is covered by test_shared_storage's killed sweep, whose cluster's
# dashboard agent must listen on loopback.
NO_RAY_DASHBOARD = "ray.include_dashboard=false"

# The heaviest test modules (seconds of one pytest worker, measured with --durations=0 on this
# 2-core machine), run first: with `pytest -n 2 --dist loadfile --no-loadscope-reorder` (make
# test) each module stays on one worker, and starting the long ones first keeps one worker from
# being left alone with one at the end. Without --no-loadscope-reorder xdist ignores this order
# and hands out the modules with the most tests first.
HEAVY_FIRST = [
    "synthmed/test_prepared_build.py", "tune/test_sweep.py", "tune/test_chaos.py", "tune/test_sweep_outcomes.py",
    "run/test_real_models_e2e.py", "tune/test_multinode.py", "benchmarks/test_gpu_check.py", "run/test_ray_train.py",
    "tune/test_shared_storage.py", "tune/test_results.py", "run/test_pipeline_in_ray.py", "run/test_remote_run.py",
    "run/test_real_data_train.py", "tune/test_ablation.py", "synthmed/test_expert_clip.py", "run/test_acceleration.py",
    "run/test_network.py", "benchmarks/test_loop_bench.py", "synthmed/test_base_lvlm.py", "benchmarks/test_step_bench.py",
    "run/test_preflight.py",
]


def pytest_collection_modifyitems(session, config, items):
    """Heaviest modules first (stable: the order inside a module and among the rest is kept)."""
    rank = {name: index for index, name in enumerate(HEAVY_FIRST)}

    def key(item):
        path = item.nodeid.split("::", 1)[0].removeprefix("tests/")
        return rank.get(path, len(rank))

    items[:] = sorted(items, key=key)


PROMPTS = [
    ("is there a lesion ?", "yes"),
    ("where is the lesion located in this scan ?", "left upper quadrant"),
    ("how many lesions ?", "two"),
]


@pytest.fixture(scope="session")
def tiny_student_dir(tmp_path_factory):
    from medalign_platform.synthmed.tiny_student import tiny_student

    return tiny_student(tmp_path_factory.mktemp("tiny_student"))


@pytest.fixture(scope="session")
def random_images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(len(PROMPTS))]


def make_batch(processor, images, padding_side: str = "left", with_answers: bool = True) -> dict:
    """A processor batch with mixed prompt lengths, padding and answer-only labels.

    Labels are -100 on the prompt and on padding, so the answer starts at the first
    position whose label is not -100.
    """
    tokenizer = processor.tokenizer
    tokenizer.padding_side = padding_side
    prompts = [f"USER: <image>\n{q} ASSISTANT:" for q, _ in PROMPTS[: len(images)]]
    texts = [f"{p} {a}</s>" for p, (_, a) in zip(prompts, PROMPTS)] if with_answers else prompts
    batch = dict(processor(images=images, text=texts, return_tensors="pt", padding=True))
    if with_answers:
        labels = torch.full_like(batch["input_ids"], -100)
        for i, prompt in enumerate(prompts):
            prompt_len = len(processor(images=images[i], text=prompt, return_tensors="pt")["input_ids"][0])
            real = batch["attention_mask"][i].nonzero().flatten()
            start = int(real[0]) + prompt_len
            end = int(real[-1]) + 1
            labels[i, start:end] = batch["input_ids"][i, start:end]
        batch["labels"] = labels
    return batch


@dataclass
class FakeTeacherTargets:
    """Native-grid teacher outputs with the TeacherOutputs fields (random, for losses)."""

    patch_tokens: torch.Tensor
    cls_attention: torch.Tensor
    grid: tuple[int, int]


def random_teacher_targets(batch_size: int, grid=(4, 4), width: int = 32, seed: int = 0) -> FakeTeacherTargets:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch_size, grid[0] * grid[1], width, generator=generator)
    attention = torch.softmax(torch.randn(batch_size, grid[0] * grid[1], generator=generator), dim=-1)
    return FakeTeacherTargets(tokens, attention, grid)


# --------------------------------------------------------------------------- storage servers
# One of each per test session, started on first use (tests/storage_servers.py): every
# test that needs S3 or PostgreSQL uses its own prefix or study name on the same server.


@pytest.fixture(scope="session")
def s3():
    """An S3 server (moto) on 127.0.0.1 with one bucket; ``AWS_*`` point at it for the session."""
    from storage_servers import s3_server

    with s3_server() as server:
        yield server


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server on 127.0.0.1 (the machine's binaries) with an empty database."""
    from storage_servers import postgres_bin, postgres_server

    if postgres_bin() is None:
        pytest.skip("no PostgreSQL server binaries (initdb) on this machine: `make system-deps` installs them "
                    "(Debian: apt-get install postgresql)")
    with postgres_server() as server:
        yield server


@pytest.fixture(scope="module")
def stub_config(tmp_path_factory):
    """The composed synthmed_vqa config; paths come from a stub prepared.json (nothing loaded)."""
    from medalign_platform.run.compose import compose_config

    cache = tmp_path_factory.mktemp("stub_cache")
    root = cache / "synthmed"
    root.mkdir()
    (root / "prepared.json").write_text(json.dumps({k: str(root / k) for k in ("data", "teacher", "student")}
                                                   | {"cache": str(root)}))
    patch = pytest.MonkeyPatch()
    patch.setenv("MEDALIGN_CACHE", str(cache))
    try:
        yield compose_config(["experiment=synthmed_vqa", "trainer.max_steps=40", "trainer.eval_every=10"])
    finally:
        patch.undo()
