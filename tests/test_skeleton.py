"""Project layout and CLI entry points."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from medalign_platform.cli import SUBCOMMANDS, main, parse_overrides

ROOT = Path(__file__).resolve().parents[1]


def test_import_platform_is_the_stdlib_module():
    import platform

    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    assert Path(platform.__file__).resolve().parent == stdlib
    assert callable(platform.system) and platform.python_version()
    assert not (ROOT / "platform" / "__init__.py").exists()


def test_stdlib_platform_wins_even_from_the_repo_root():
    """Ray puts the working dir first on sys.path; `platform/` must not shadow the stdlib there."""
    code = "import platform, sys; print(platform.__file__); print(platform.machine())"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "site-packages" not in out.stdout.splitlines()[0]
    assert not out.stdout.splitlines()[0].startswith(str(ROOT / "platform"))


@pytest.mark.parametrize(
    "command",
    [[sys.executable, "-m", "medalign_platform", "--help"], [str(Path(sys.executable).with_name("medalign")), "--help"]],
)
def test_help_lists_every_subcommand(command):
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    for name in ("prepare", "train", "sweep", "ablate-layers", "status", "dashboard", "export"):
        assert name in out


def test_overrides_parse_hydra_style_with_yaml_types():
    assert parse_overrides(["trial.max_steps=50", "experiment=synthmed_vqa", "distill.lambda_attn=0.06"]) == {
        "trial": {"max_steps": 50},
        "experiment": "synthmed_vqa",
        "distill": {"lambda_attn": 0.06},
    }
    with pytest.raises(SystemExit, match="key=value"):
        parse_overrides(["trial.max_steps"])


def test_every_subcommand_has_a_handler_and_path_commands_need_a_path():
    from medalign_platform.cli import HANDLERS

    assert set(SUBCOMMANDS) == set(HANDLERS) == {
        "prepare", "train", "sweep", "ablate-layers", "status", "dashboard", "export", "convert", "check"}
    assert all(built for _, _, built in SUBCOMMANDS.values())
    for command in ("status", "dashboard"):
        with pytest.raises(SystemExit, match=f"usage: medalign {command} EXP_DIR"):
            main([command])


def test_convert_usage_and_errors_are_one_line(capsys):
    with pytest.raises(SystemExit, match="usage: medalign convert llava-med SRC OUT"):
        main(["convert", "llava-med", "only-one"])
    assert main(["convert", "unimed-clip", "/nonexistent.pt", "/tmp/never-written"]) == 2
    assert "/nonexistent.pt" in capsys.readouterr().err
