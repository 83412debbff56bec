"""The code gate CI runs with the tests: ruff (pyflakes, pycodestyle, bugbear, simplify, pyupgrade for
3.10, complexity), ruff's formatter and mypy over neuronserve/, compile/ and bench/, each passing with
the settings in pyproject.toml."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TREES = ["neuronserve", "compile", "bench"]

pytestmark = pytest.mark.timeout(300)


def run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True)


def test_ruff_finds_nothing():
    result = run("ruff", "check", "--no-cache", *TREES)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_code_is_formatted():
    result = run("ruff", "format", "--check", "--no-cache", *TREES)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_finds_nothing():
    result = run("mypy", *TREES)
    assert result.returncode == 0, result.stdout + result.stderr
