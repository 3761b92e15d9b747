"""Runs ``mcf <args>`` with the pre-training loader stalling (a hung file system or object store) before
its batch number ``MCF_STALL_AT`` (0-based, per rank): it writes the file ``MCF_STALL_MARK`` and sleeps
``MCF_STALL_S`` seconds in the data path. For tests/test_watchdog.py."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import mcf.data

_build = mcf.data.build_pretrain_loader


class StallingLoader:
    """The real loader, whose iteration stalls before batch ``at`` (counted over epochs)."""

    def __init__(self, loader, at: int, seconds: float, mark: Path):
        self._loader, self._at, self._seconds, self._mark, self._served = loader, at, seconds, mark, 0

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def __len__(self) -> int:
        return len(self._loader)

    def __iter__(self):
        for batch in self._loader:
            if self._served == self._at:
                self._mark.write_text(str(os.getpid()))
                stall_in_data_path(self._seconds)
            self._served += 1
            yield batch


def stall_in_data_path(seconds: float) -> None:
    time.sleep(seconds)


def _stalling_build(*args, **kwargs):
    return StallingLoader(
        _build(*args, **kwargs),
        int(os.environ["MCF_STALL_AT"]),
        float(os.environ.get("MCF_STALL_S", "600")),
        Path(os.environ["MCF_STALL_MARK"]),
    )


mcf.data.build_pretrain_loader = _stalling_build

from mcf.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
