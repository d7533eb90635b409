"""The package stays ruff-clean, mypy --strict clean, and keeps its declared layers."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "argv",
    [
        [sys.executable, "-m", "ruff", "check", "reconciler", "tests", "benchmarks"],
        [sys.executable, "-m", "mypy", "--strict", "reconciler"],
        ["lint-imports"],
    ],
    ids=["ruff", "mypy", "import-linter"],
)
def test_checker_passes(argv: list[str]) -> None:
    if argv[0] == "lint-imports":
        argv[0] = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
