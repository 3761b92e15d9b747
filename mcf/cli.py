"""The ``mcf`` command: a thin dispatcher over the library's components.

Each command lives in its component's ``cli`` module, which exposes ``add_parser(subparsers)``;
those modules import nothing heavy at the top, so ``mcf --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from mcf.errors import UserError
from mcf.logs import setup_logging
from mcf.threads import set_cpu_threads

# (module, command names it registers): imported lazily so a missing optional extra only
# breaks its own command.
COMMAND_MODULES = [
    "mcf.train.cli",
    "mcf.data.cli",
    "mcf.downstream.cli",
    "mcf.bench.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mcf", description="Mask Contrastive Face pre-training and evaluation.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        if hasattr(module, "add_parser"):
            module.add_parser(sub)
    return parser


def _pop_local_rank(argv: list[str]) -> list[str]:
    """Remove ``--local_rank=N`` / ``--local-rank N`` (which the deepspeed launcher and
    ``torch.distributed.launch`` put before the subcommand) into ``LOCAL_RANK``."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        for flag in ("--local_rank", "--local-rank"):
            if arg == flag and i + 1 < len(argv):
                os.environ.setdefault("LOCAL_RANK", argv[i + 1])
                i += 2
                break
            if arg.startswith(flag + "="):
                os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
                i += 1
                break
        else:
            out.append(arg)
            i += 1
    return out


MAX_ERROR_CHARS = 2000  # a path or value quoted from hostile input can be any length


def _bounded(message: str) -> str:
    if len(message) <= MAX_ERROR_CHARS:
        return message
    return f"{message[:MAX_ERROR_CHARS]}… ({len(message)} characters in all)"


def main(argv: list[str] | None = None) -> int:
    argv = _pop_local_rank(sys.argv[1:] if argv is None else list(argv))
    parser = build_parser()
    if not argv:
        argv = ["pretrain"]  # the main job on the built-in default (the demo preset)
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    setup_logging()
    set_cpu_threads()  # before torch starts its thread pool: per rank, whichever launcher started us
    try:
        rc = args.func(args)
    except UserError as e:
        print(f"mcf: error: {_bounded(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mcf: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    raise SystemExit(main())
