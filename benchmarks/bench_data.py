"""Loader images/s: mcf's DALI loader vs its PyTorch loader (and the release's PIL DataLoader) on the same files.

A thin wrapper over ``mcf bench data``; every flag is that command's (``--help``). JSON on stdout,
and into ``--out`` when given.

    python benchmarks/bench_data.py [flags]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mcf.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["bench", "data", *sys.argv[1:]]))
