"""``mcf bench attention``: runs ``benchmarks/bench_attention.py`` (the kernels' benchmark, owned
with the kernels) and reports its JSON with this run's date, commit and device added.

Arguments after ``attention`` pass through unchanged (``--tiny``, ``--full``, ``--batch 64`` ...).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

from mcf.bench.common import REPO_ROOT, emit
from mcf.errors import UserError

BENCH_FILE = REPO_ROOT / "benchmarks" / "bench_attention.py"


def load_bench_attention(path: Path = BENCH_FILE) -> ModuleType:
    if not path.is_file():
        raise UserError(f"{path} not found: `mcf bench attention` runs the kernels' benchmark from a source checkout")
    spec = importlib.util.spec_from_file_location("bench_attention", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def run(argv: list[str]) -> dict[str, Any]:
    import torch

    from mcf.bench.common import run_info
    from mcf.measure import device_name, resolve_device

    bench = load_bench_attention()
    argv = [a for a in argv if a != "--"]
    with tempfile.TemporaryDirectory(prefix="mcf-bench-attn-") as tmp:
        path = Path(tmp) / "attention.json"
        with contextlib.redirect_stdout(sys.stderr):  # its progress lines; stdout carries the JSON
            rc = bench.main([*argv, "--json", str(path)])
        if rc:
            raise UserError(f"bench_attention.py exited with {rc}")
        result = json.loads(path.read_text())
    device = resolve_device("auto")
    if "--device" in argv:
        device = torch.device(argv[argv.index("--device") + 1])
    # the TritonFaster(...) lines to paste into mcf/kernels/dispatch.py (a comment saying none when Triton never won)
    rows = bench.suggested_rows(result)
    print(rows, file=sys.stderr)
    return {"benchmark": "attention", "device": device_name(device), **result, "suggested_rows": rows, **run_info(device)}


def main(argv: list[str], out: str | None = None) -> int:
    emit(run(argv), out)
    return 0
