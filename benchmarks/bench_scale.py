"""Per-rank model + optimizer bytes and step time under ZeRO 0/1/2/3 with 2 ranks (torchrun).

A thin wrapper over ``mcf bench scale``; every flag is that command's (``--help``). JSON on stdout,
and into ``--out`` when given.

    python benchmarks/bench_scale.py [flags]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mcf.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main(["bench", "scale", *sys.argv[1:]]))
