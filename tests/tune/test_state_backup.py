"""tune/state_backup.py: a kill during Tune's copy of its state does not break ``resume=true``."""

from __future__ import annotations

import json
import pickle
import zipfile

import pytest

from medalign_platform.common.errors import ConfigError
from medalign_platform.tune.state_backup import (ARCHIVE, TuneStateBackup, back_up_tune_state, reads_whole,
                                                 repair_tune_state)

STATE = {"experiment_state-2026-12-01_06-38-18.json": json.dumps({"trial_data": [["t1", "x"]]}).encode(),
         # (Tune pickles its searcher generator's state under a .json name)
         "search_gen_state-2026-12-01_06-38-18.json": pickle.dumps({"counter": 1}, protocol=5),
         "searcher-state-2026-12-01_06-38-18.pkl": pickle.dumps({"_space": {"lr": [1, 2]}})}


def _write(folder, contents):
    for name, data in contents.items():
        (folder / name).write_bytes(data)


def test_whole_and_cut_off_state_files_are_told_apart():
    for name, data in STATE.items():
        assert reads_whole(data)
        assert not reads_whole(b"")
        assert not reads_whole(data[:-1]), name   # cut off by one byte
    assert not reads_whole(b"{}garbage")
    assert not reads_whole(b"\x80\x05garbage")


def test_the_archive_restores_state_files_a_kill_left_empty(tmp_path):
    _write(tmp_path, STATE)
    (tmp_path / "trial_1").mkdir()   # not state: never archived or touched
    assert back_up_tune_state(tmp_path)
    with zipfile.ZipFile(tmp_path / ARCHIVE) as archive:
        assert sorted(archive.namelist()) == sorted(STATE)
    # What the suite saw after a SIGKILL during Tune's copy: both JSON files 0 bytes.
    for name in STATE:
        if name.endswith(".json"):
            (tmp_path / name).write_bytes(b"")
    assert repair_tune_state(tmp_path) == sorted(STATE)
    assert {name: (tmp_path / name).read_bytes() for name in STATE} == STATE


def test_a_set_caught_mid_copy_is_not_archived_over_the_last_whole_one(tmp_path):
    _write(tmp_path, STATE)
    assert back_up_tune_state(tmp_path)
    newer = {**STATE, "searcher-state-2026-12-01_06-38-18.pkl": pickle.dumps({"_space": {"lr": [3]}})[:-3]}
    _write(tmp_path, newer)            # the searcher state half-copied
    assert not back_up_tune_state(tmp_path)
    with zipfile.ZipFile(tmp_path / ARCHIVE) as archive:
        assert {name: archive.read(name) for name in archive.namelist()} == STATE


def test_whole_state_is_left_alone_and_broken_state_without_an_archive_is_refused(tmp_path):
    _write(tmp_path, STATE)
    assert repair_tune_state(tmp_path) == []              # whole: left alone, no archive needed
    (tmp_path / "experiment_state-2026-12-01_06-38-18.json").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"experiment_state-2026-12-01_06-38-18.json\) was cut off by a kill .* "
                                          r"start it again with a new sweep.name"):
        repair_tune_state(tmp_path)                        # broken, and nothing to restore from
    assert (tmp_path / "experiment_state-2026-12-01_06-38-18.json").read_bytes() == b""


def test_a_broken_state_file_newer_than_the_archive_is_set_aside(tmp_path):
    _write(tmp_path, STATE)
    assert back_up_tune_state(tmp_path)
    later = "experiment_state-2026-12-01_07-00-00.json"   # a second start, cut off before any archive
    (tmp_path / later).write_bytes(b'{"trial_da')
    assert repair_tune_state(tmp_path) == sorted(STATE)
    assert not (tmp_path / later).exists() and (tmp_path / f".{later}.broken").read_bytes() == b'{"trial_da'


def test_the_callback_archives_each_change_once(tmp_path):
    _write(tmp_path, STATE)
    callback = TuneStateBackup(str(tmp_path), interval_s=0.0)
    callback.on_step_end(1, [])
    first = (tmp_path / ARCHIVE).stat().st_mtime_ns
    callback.on_step_end(2, [])                            # unchanged: not rewritten
    assert (tmp_path / ARCHIVE).stat().st_mtime_ns == first
    changed = {"search_gen_state-2026-12-01_06-38-18.json": pickle.dumps({"counter": 2}, protocol=5)}
    _write(tmp_path, changed)
    callback.on_experiment_end([])
    with zipfile.ZipFile(tmp_path / ARCHIVE) as archive:
        assert archive.read("search_gen_state-2026-12-01_06-38-18.json") == changed[
            "search_gen_state-2026-12-01_06-38-18.json"]
