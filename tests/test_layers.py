"""The package's layers (pyproject.toml's import-linter contracts): no upward imports, no cycles."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on the ``attnssl`` package under ``root`` with ``root``'s contracts."""
    return subprocess.run(
        [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
         "sys.exit(lint_imports_command())", "--config", str(root / "pyproject.toml"),
         "--no-cache"],
        cwd=root, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True)


def test_the_package_keeps_its_layers():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_an_upward_import_or_a_cycle_breaks_the_contracts(tmp_path):
    shutil.copytree(ROOT / "attnssl", tmp_path / "attnssl",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    # the maths reaching up into the trainer, and two sibling modules importing each other
    schedules = tmp_path / "attnssl" / "functional" / "schedules.py"
    schedules.write_text(schedules.read_text() + "\nimport attnssl.train.trainer  # noqa\n")
    knn = tmp_path / "attnssl" / "eval" / "knn.py"
    knn.write_text(knn.read_text() + "\nimport attnssl.eval.evaluate  # noqa\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "attnssl.functional.schedules -> attnssl.train.trainer" in result.stdout
    assert "each layer imports only the layers below it BROKEN" in result.stdout
    assert "no import cycles between the modules of a package BROKEN" in result.stdout
