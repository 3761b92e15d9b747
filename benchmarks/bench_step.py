"""Compute-only training step: the paper's step vs mcf's (images/s, MFU); `--e2e` puts the loader in the loop.

A thin wrapper over ``mcf bench step``; every flag is that command's (``--help``). JSON on stdout,
and into ``--out`` when given.

    python benchmarks/bench_step.py [flags]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mcf.cli import main  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    command = "step"
    if command == "step" and "--e2e" in argv:
        argv.remove("--e2e")
        command = "e2e"
    raise SystemExit(main(["bench", command, *argv]))
