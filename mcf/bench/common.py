"""Shared pieces of the benchmarks: run metadata and JSON output (device, timing, peak matmul rate and
peak memory are :mod:`mcf.measure`, which training uses too).

Every benchmark reports what it measured in this process only; nothing here estimates a figure.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "mcf", "kernels", "benchmarks"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10)
        commit = out.stdout.strip() or "unknown"
        return commit + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_info(device: torch.device) -> dict[str, Any]:
    """Date, commit, versions and host: what RESULTS.md quotes next to each figure."""
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": git_commit(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def emit(result: dict[str, Any], out: str | None) -> None:
    """Print ``result`` as JSON on stdout and, with ``out``, write it there (a folder takes
    ``<result['benchmark']>.json``)."""
    text = json.dumps(result, indent=2, sort_keys=False)
    print(text)
    if out:
        path = Path(out)
        if path.suffix != ".json":
            path.mkdir(parents=True, exist_ok=True)
            path = path / f"{result.get('benchmark', 'bench')}.json"
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
