"""Project layout and CLI entry points."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from medalign_platform.cli import SUBCOMMANDS, main
from medalign_platform.common.errors import ConfigError
from medalign_platform.common.overrides import as_tree, parse_overrides

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


def test_overrides_parse_hydra_style_with_typed_values():
    assert as_tree(parse_overrides(["trial.max_steps=50", "experiment=synthmed_vqa", "distill.lambda_attn=0.06"])) == {
        "trial": {"max_steps": 50},
        "experiment": "synthmed_vqa",
        "distill": {"lambda_attn": 0.06},
    }
    # One grammar for every subcommand: Hydra's (what the config composer reads too).
    parsed = parse_overrides(["layers=[1,2]", "sweep.trial_resources={CPU: 1}", "distill.steer.mode=off", "n=null"])
    assert [o.value for o in parsed] == [[1, 2], {"CPU": 1}, "off", None]
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["trial.max_steps"])
    assert main(["train", "trial.max_steps"]) == 2


def test_every_subcommand_has_a_handler_and_path_commands_need_a_path():
    assert set(SUBCOMMANDS) == {"prepare", "train", "sweep", "ablate-layers", "status", "dashboard", "export",
                                "convert", "check"}
    assert all(callable(handler) for _, handler, _ in SUBCOMMANDS.values())
    for command in ("status", "dashboard"):
        with pytest.raises(SystemExit, match=f"usage: medalign {command} EXP_DIR"):
            main([command])


def test_the_package_facade_exposes_the_main_api_lazily():
    code = ("import sys, medalign_platform as m; assert 'torch' not in sys.modules; "
            "from medalign_platform import DistillSettings, MedAlignObjective, load_student, run_sweep; "
            "assert MedAlignObjective.__module__ == 'medalign_platform.core.objective'; print(sorted(dir(m))[:3])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().startswith("[")


def test_convert_usage_and_errors_are_one_line(capsys):
    with pytest.raises(SystemExit, match="usage: medalign convert llava-med SRC OUT"):
        main(["convert", "llava-med", "only-one"])
    assert main(["convert", "unimed-clip", "/nonexistent.pt", "/tmp/never-written"]) == 2
    assert "/nonexistent.pt" in capsys.readouterr().err
