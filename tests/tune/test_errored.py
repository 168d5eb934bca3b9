"""``tune/errored.py``: what ``resume=true`` does with errored trials, on local disk and on an S3
server (moto on 127.0.0.1): errored trials are marked ERROR in Tune's saved state, and with
``restart_errored`` what they left is set aside (moved, result files copied), nothing deleted.

The whole resume on a local folder is ``tests/tune/test_sweep_outcomes.py``."""

from __future__ import annotations

import json

import pytest
from medalign_platform.run.filesystems import StoragePath
from medalign_platform.tune.errored import errored_in_state, mark_errored_in_state, set_aside_errored_trials

TRIAL_FILES = {
    "result.json": '{"step": 2}\n',
    "params.json": "{}",
    "trial.log": "log",
    "checkpoint_000000/adapter.safetensors": "weights",
    "checkpoint_000000/trainer_state.json": '{"step": 2}',
}


def _trial(trial_id: str, status: str) -> list:
    return [json.dumps({"trial_id": trial_id, "status": status}), "{}"]


def _experiment(root: StoragePath) -> None:
    """Two saved states in which trial ``bad`` still says RUNNING though the driver saw it error."""
    for stamp in ("2026-11-30_08-00-00", "2026-11-30_08-00-05"):
        state = {"trial_data": [_trial("bad", "RUNNING"), _trial("good", "TERMINATED"), _trial("next", "PENDING")]}
        (root / f"experiment_state-{stamp}.json").write_text(json.dumps(state))
    (root / "errored.json").write_text(json.dumps({"bad": {"at": 1.0}}))
    for trial_id in ("bad", "good"):
        for rel, text in TRIAL_FILES.items():
            (root / f"trial_{trial_id}" / rel).write_text(text)


@pytest.fixture(params=["local", "s3"])
def experiment(request, tmp_path):
    if request.param == "local":
        root = StoragePath(tmp_path / "exp")
        root.mkdir()
    else:
        server = request.getfixturevalue("s3")
        root = StoragePath(server.uri(f"errored-{tmp_path.name}"))
    _experiment(root)
    return root


def test_errored_trials_are_marked_in_every_saved_state(experiment):
    assert errored_in_state(experiment) == []
    assert mark_errored_in_state(experiment) == ["bad", "bad"]  # once per state file
    assert errored_in_state(experiment) == ["bad"]
    for path in (p for p in experiment.iterdir() if p.name.startswith("experiment_state-")):
        statuses = {json.loads(e[0])["trial_id"]: json.loads(e[0])["status"]
                    for e in json.loads(path.read_text())["trial_data"]}
        assert statuses == {"bad": "ERROR", "good": "TERMINATED", "next": "PENDING"}
    assert mark_errored_in_state(experiment) == []  # nothing left to change


def test_restart_errored_sets_aside_what_the_errored_trial_left_and_keeps_the_rest(experiment):
    mark_errored_in_state(experiment)
    assert set_aside_errored_trials(experiment) == ["bad"]
    bad, good = experiment / "trial_bad", experiment / "trial_good"
    (aside,) = [p.name for p in bad.iterdir() if p.name.startswith(".restarted-")]
    files = bad.files()
    # Moved: the checkpoint and the log. Copied: the result files Tune reads while it restores.
    assert sorted(files) == sorted([*(f"{aside}/{rel}" for rel in TRIAL_FILES), "params.json", "result.json"])
    assert (bad / aside / "checkpoint_000000" / "adapter.safetensors").read_text() == "weights"
    assert sorted(good.files()) == sorted(TRIAL_FILES)  # a finished trial is not touched
    assert (bad / aside / "trial.log").read_text() == "log"
