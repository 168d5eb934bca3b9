"""The package layout keeps its rules: dependencies point one way, modules stay small, docs stay current."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "platform" / "medalign_platform"
# Each sub-package may import only from sub-packages of a lower rank; convert and run, and synthmed and tune, are
# siblings: neither imports the other. The top level (cli, the facade) may import all.
RANK = {"common": 0, "core": 1, "data": 2, "convert": 3, "run": 3, "synthmed": 4, "tune": 4, "": 5}
MAX_LINES = 600


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _package_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else ""


def _imported_packages(path: Path) -> set[str]:
    """Sub-packages of medalign_platform that ``path`` imports (relative or absolute, lazy ones too)."""
    here = path.relative_to(PACKAGE).parent.parts
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(here[: len(here) - (node.level - 1)]) if node.level > 1 else list(here)
                target = base + (node.module.split(".") if node.module else [])
                names = [target] if node.module else [target + [alias.name] for alias in node.names]
            elif node.module and node.module.split(".")[0] == "medalign_platform":
                names = [node.module.split(".")[1:]]
            else:
                continue
            for parts in names:
                if parts and (PACKAGE / parts[0]).is_dir():
                    found.add(parts[0])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "medalign_platform" and len(parts) > 1 and (PACKAGE / parts[1]).is_dir():
                    found.add(parts[1])
    return found


def test_dependencies_point_one_way():
    upward = []
    for path in _modules():
        mine = _package_of(path)
        for target in _imported_packages(path) - {mine}:
            if RANK[target] >= RANK[mine]:
                upward.append(f"{path.relative_to(PACKAGE)} imports {target}/")
    assert upward == [], "imports against the layer order common <- core <- data <- run <- (synthmed, tune) <- cli"


def test_the_layer_check_sees_relative_and_lazy_imports(tmp_path):
    """A positive control: the checker flags an upward import written the ways the package writes them."""
    module = PACKAGE / "core" / "_upward_probe.py"
    module.write_text("def f():\n    from ..tune.layout import META_KEY\n    from ..data import splits\n")
    try:
        assert _imported_packages(module) == {"tune", "data"}
    finally:
        module.unlink()


def test_no_platform_package_shadows_the_stdlib():
    assert not (ROOT / "platform" / "__init__.py").exists()


def test_modules_stay_short_or_say_why():
    long = [f"{p.relative_to(PACKAGE)} ({n} lines)" for p in _modules()
            if (n := len(p.read_text().splitlines())) > MAX_LINES and "longer than 600 lines because" not in p.read_text()]
    assert long == []


def test_settings_reference_is_current():
    from medalign_platform.run.settings import settings_reference

    assert (ROOT / "docs" / "settings.md").read_text() == settings_reference(), \
        "regenerate: python -m medalign_platform.run.settings > docs/settings.md"


@pytest.mark.parametrize("section", ["model", "teacher", "data", "distill", "lora", "optim", "trainer", "ray", "run",
                                     "tensorboard"])
def test_every_section_has_help_for_every_key(section):
    from medalign_platform.run.settings import _SECTIONS

    rows = _SECTIONS[section].describe()
    assert rows and all(row["help"] for row in rows), [row["key"] for row in rows if not row["help"]]


def test_the_heaviest_test_modules_exist_and_make_test_keeps_their_order():
    """``HEAVY_FIRST`` (tests/conftest.py) names real modules, and ``make test`` tells xdist to keep
    the collection order: by default it hands out the modules with the most tests first."""
    from conftest import HEAVY_FIRST

    assert [name for name in HEAVY_FIRST if not (ROOT / "tests" / name).is_file()] == []
    assert len(set(HEAVY_FIRST)) == len(HEAVY_FIRST)
    makefile = (ROOT / "Makefile").read_text().splitlines()
    recipe = makefile[makefile.index(next(line for line in makefile if line.startswith("test:"))) + 1:]
    pytest_line = next(line for line in recipe if " -m pytest " in line)
    assert "--dist loadfile" in pytest_line and "--no-loadscope-reorder" in pytest_line, pytest_line
