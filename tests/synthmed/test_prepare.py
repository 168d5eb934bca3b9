"""The prepare cache: stages are reused when their recipe is unchanged and rebuilt when not."""

from __future__ import annotations

import json

import pytest

from medalign_platform.cli import main
from medalign_platform.synthmed.prepare import cached_stage, prepared_synthmed_record


def test_stage_is_built_once_and_reused(tmp_path):
    calls = []

    def build(out):
        calls.append(out)
        (out / "payload.txt").write_text("built")
        return {"figure": 0.5}

    first, info = cached_stage(tmp_path, "teacher", {"recipe": 1, "seed": 0}, build)
    again, info_again = cached_stage(tmp_path, "teacher", {"recipe": 1, "seed": 0}, build)
    assert first == again and len(calls) == 1
    assert info_again["summary"] == {"figure": 0.5} and (first / "payload.txt").read_text() == "built"
    assert not list(tmp_path.glob(".*tmp*")), "no temporary directory is left behind"


def test_a_changed_recipe_rebuilds_into_a_new_stage(tmp_path):
    built = []
    build = lambda out: built.append(out) or {}  # noqa: E731
    old, _ = cached_stage(tmp_path, "data", {"version": 1}, build)
    new, _ = cached_stage(tmp_path, "data", {"version": 2}, build)  # e.g. SYNTHMED_VERSION bumped
    assert old != new and len(built) == 2


def test_an_interrupted_build_leaves_no_stage(tmp_path):
    def crash(out):
        (out / "half.txt").write_text("x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cached_stage(tmp_path, "student", {"recipe": 1}, crash)
    assert not list(tmp_path.glob("student-*")) and not list(tmp_path.glob(".student-*"))
    rebuilt, _ = cached_stage(tmp_path, "student", {"recipe": 1}, lambda out: {"ok": True})
    assert json.loads((rebuilt / "stage.json").read_text())["summary"] == {"ok": True}


def test_unprepared_cache_names_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="medalign prepare data=synthmed"):
        prepared_synthmed_record(str(tmp_path))


def test_prepare_rejects_unknown_datasets_and_keys(capsys):
    # other names go to the real-data adapters (tests/data/test_prepare_data.py)
    assert main(["prepare", "data=nih_cxr"]) == 2
    assert "Could not find 'data/nih_cxr'" in capsys.readouterr().err
    assert main(["prepare"]) == 2
    assert "name the dataset: data=synthmed" in capsys.readouterr().err
    assert main(["prepare", "data=synthmed", "n_trian=5"]) == 2
    assert "unknown key n_trian; did you mean n_train? valid options" in capsys.readouterr().err
    assert main(["prepare", "data=synthmed", "n_train=abc"]) == 2
    assert "n_train must be an integer, got 'abc'" in capsys.readouterr().err
