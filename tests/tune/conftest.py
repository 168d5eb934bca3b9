"""Fixtures shared by the sweep tests."""

import json

import pytest


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
