"""The house rules ruff enforces (``ruff.toml``: pyflakes, pycodestyle with lines of at most 120 columns, import
order, bugbear, pyupgrade) hold for the whole repository, so ``make test`` and CI refuse what ``ruff check`` would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_check_passes_on_the_repository():
    pytest.importorskip("ruff", reason="ruff is in the test extras (pip install -e .[test])")
    p = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert "line-length = 120" in (ROOT / "ruff.toml").read_text()
