"""Every error prints as one line with its fix; a traceback only with --debug; Ctrl-C exits 130."""

from __future__ import annotations

import errno
import json

import pytest

from medalign_platform import cli
from medalign_platform.common.errors import ConfigError, one_line, platform_error
from medalign_platform.data.conversations import DatasetError


def test_a_platform_error_raised_in_a_ray_worker_is_found_inside_ray_s_wrappers():
    from ray.exceptions import RayTaskError
    from ray.train.v2.api.exceptions import WorkerGroupError

    original = DatasetError("/d/train.json: record 3 (id='x', image=a.png): unreadable image. Fix: re-create it")
    in_task = RayTaskError("train_loop_per_worker", "Traceback (most recent call last):\n  ...", original)
    wrapped = in_task.as_instanceof_cause()  # what ray.get raises: a RayTaskError that *is* a DatasetError
    for error in (wrapped, WorkerGroupError("rank 0 failed", {0: wrapped}), RuntimeError("fit failed")):
        if isinstance(error, RuntimeError) and not isinstance(error, WorkerGroupError):
            error.__cause__ = WorkerGroupError("rank 1 failed", {1: original})
        assert platform_error(error) is original
        line, status = one_line(error)
        assert (line, status) == (str(original), 2)
        assert "Traceback" not in line and "\n" not in line


@pytest.mark.parametrize("error, expected, status", [
    (OSError(errno.ENOSPC, "No space left on device", "/runs/x/checkpoint_000003/optimizer.pt"),
     "No space left on device (/runs/x/checkpoint_000003/optimizer.pt); free disk space there", 1),
    (PermissionError(errno.EACCES, "Permission denied", "/shared/sweeps"),
     "Permission denied (/shared/sweeps); check the permissions", 1),
    (FileNotFoundError("no complete checkpoint under runs/x"), "no complete checkpoint under runs/x", 2),
    (KeyError("step"), "internal error: KeyError: 'step' (run again with --debug for the traceback)", 1),
])
def test_operating_system_and_internal_errors_are_one_line_too(error, expected, status):
    line, got = one_line(error)
    assert line.startswith(expected) and got == status and "\n" not in line


def _failing_handler(error: BaseException):
    def handler(args) -> int:
        raise error

    return handler


@pytest.mark.parametrize("debug", [False, True])
def test_the_cli_prints_one_line_and_the_traceback_only_with_debug(monkeypatch, capsys, debug):
    from ray.exceptions import RayTaskError

    error = RayTaskError("sweep_trial", "remote traceback", ConfigError("trainer.max_steps must be >= 1, got 0"))
    entry = cli.SUBCOMMANDS["export"]
    monkeypatch.setitem(cli.SUBCOMMANDS, "export", (entry[0], _failing_handler(error.as_instanceof_cause()), entry[2]))
    argv = ["export", "runs/x", "--out", "y"] + (["--debug"] if debug else [])
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "medalign export: trainer.max_steps must be >= 1, got 0"
    assert ("Traceback" in err) == debug


def test_ctrl_c_exits_130_without_a_traceback(monkeypatch, capsys):
    entry = cli.SUBCOMMANDS["export"]
    monkeypatch.setitem(cli.SUBCOMMANDS, "export", (entry[0], _failing_handler(KeyboardInterrupt()), entry[2]))
    assert cli.main(["export", "runs/x", "--out", "y"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "medalign export: interrupted" and "Traceback" not in err


def test_export_of_a_run_without_a_complete_checkpoint_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoint_000001").mkdir(parents=True)
    (run / "checkpoint_000001" / "trainer_state.json").write_text(json.dumps({"step": 2}))  # nothing else
    (run / "config.json").write_text("{}")
    assert cli.main(["export", str(run), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medalign export: no complete checkpoint") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
