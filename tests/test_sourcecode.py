"""The typing and lint we claim are the typing and lint we have: ruff and ``mypy --strict``
run as tests, so ``make test`` fails when either does (asyncpg's ``test__sourcecode`` idea)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)


def test_ruff_is_clean() -> None:
    proc = _run(str(BIN / "ruff"), "check", "src", "tests", "bench")
    assert proc.returncode == 0, f"ruff found problems:\n{proc.stdout}{proc.stderr}"


def test_mypy_strict_is_clean() -> None:
    # pyproject.toml's [tool.mypy] says strict = true and files = src/fastcompute.
    proc = _run(sys.executable, "-m", "mypy")
    assert proc.returncode == 0, f"mypy --strict found problems:\n{proc.stdout}{proc.stderr}"
