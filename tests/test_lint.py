"""The house rules as tests, so `make test` runs them: ruff (lint + format, settings in pyproject.toml)."""

import subprocess
import sys

from tiny_params import ROOT


def ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True)


def test_ruff_lint_is_clean():
    proc = ruff("check", "--output-format", "concise", ".")
    assert proc.returncode == 0, f"`ruff check --fix .` fixes some of these:\n{proc.stdout[-4000:]}{proc.stderr}"


def test_ruff_format_is_clean():
    proc = ruff("format", "--check", ".")
    assert proc.returncode == 0, f"run `ruff format .`:\n{proc.stdout[-4000:]}{proc.stderr}"
