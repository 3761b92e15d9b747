"""Runs ``mcf <args>`` counting the host syncs of every optimizer step: each call of ``Tensor.item``,
``tolist``, ``__bool__``, ``__float__``, ``__int__``, ``__index__``, ``numpy`` (on a GPU each waits for the
device; on the CPU they are the same calls), with the calling site in mcf or DeepSpeed. Writes
``MCF_SYNC_OUT`` (JSON: per step, the list of call sites). For tests/test_host_syncs.py."""

from __future__ import annotations

import json
import os
import sys
import traceback

import torch

from mcf.train import watchdog

_records: dict[int, list[str]] = {}
_current = [0]
_inside = [False]


def _site() -> str:
    """The innermost frame in mcf or deepspeed (skipping this file and torch)."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        f = frame.filename
        if ("/mcf/" in f or "/deepspeed/" in f) and "count_syncs" not in f:
            root = "deepspeed" if "/deepspeed/" in f else "mcf"
            return f"{root}/{f.split(f'/{root}/', 1)[1]}:{frame.name}"
    return "other"


def _counting(name: str, original):
    def wrapper(self, *args, **kwargs):
        if _current[0] and not _inside[0]:
            _inside[0] = True
            try:
                _records.setdefault(_current[0], []).append(f"{name} {_site()}")
            finally:
                _inside[0] = False
        return original(self, *args, **kwargs)
    return wrapper


for _name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy"):
    setattr(torch.Tensor, _name, _counting(_name, getattr(torch.Tensor, _name)))

_step = watchdog.StepWatchdog.step


def _counting_step(self, step):
    _current[0] = step
    return _step(self, step)


watchdog.StepWatchdog.step = _counting_step

from mcf.cli import main  # noqa: E402

try:
    rc = main(sys.argv[1:])
finally:
    with open(os.environ["MCF_SYNC_OUT"], "w") as f:
        json.dump({str(k): v for k, v in _records.items()}, f, indent=1)
sys.exit(rc)
