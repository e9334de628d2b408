"""The codebase's own rules: ruff clean, stages depend only on the shared basics, configs load."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "alpaca_ray"
STAGES = ("generate", "train", "serve", "evaluate")
ORCHESTRATION = ("pipeline", "teacher")


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("stage", STAGES)
def test_stages_import_only_the_shared_basics(stage):
    forbidden = {f"alpaca_ray.{other}" for other in STAGES + ORCHESTRATION if other != stage}
    offenders = []
    for path in sorted((PACKAGE / stage).rglob("*.py")):
        for module in _imported_modules(path):
            if any(module == f or module.startswith(f + ".") for f in forbidden):
                offenders.append(f"{path.relative_to(PACKAGE.parent)} imports {module}")
    assert not offenders, "stages must not depend on each other:\n" + "\n".join(offenders)


def test_shared_basics_import_no_stage():
    forbidden = tuple(f"alpaca_ray.{name}" for name in STAGES + ORCHESTRATION)
    offenders = [f"{path.name} imports {module}"
                 for path in PACKAGE.glob("*.py") if path.name != "cli.py"
                 for module in _imported_modules(path) if module.startswith(forbidden)]
    assert not offenders, offenders


@pytest.mark.skipif(shutil.which("ruff") is None and subprocess.run(
    [sys.executable, "-m", "ruff", "--version"], capture_output=True).returncode != 0, reason="ruff not installed")
def test_ruff_clean():
    root = PACKAGE.parent
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=root,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:]
