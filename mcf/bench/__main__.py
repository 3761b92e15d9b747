"""``python -m mcf.bench {step,e2e,data,attention,memory,scale,scale-widths,ema-drift}``: the benchmarks without the
rest of the ``mcf`` command (whose other components may need packages a benchmark machine lacks)."""

from __future__ import annotations

import argparse
import sys

from mcf.bench.cli import add_parser
from mcf.errors import UserError
from mcf.logs import setup_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mcf.bench")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    setup_logging()
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"mcf bench: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
