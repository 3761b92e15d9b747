"""``mcf bench attention``: runs ``benchmarks/bench_attention.py`` (the kernels' benchmark, owned
with the kernels) and reports its JSON with this run's date, commit and device added.

Arguments after ``attention`` pass through unchanged (``--tiny``, ``--full``, ``--batch 64`` ...).

``--table`` fills the attention dispatch table instead (``mcf.kernels.dispatch``): every candidate
path (``sdpa``, ``sdpa_fp32``, ``math``; ``triton`` where it can run on the device), forward +
backward, in bf16 and fp32, at MCF's sequence lengths and head dimensions (:data:`TABLE_SHAPES`;
``--batch/--heads/--tokens/--head-dim/--dtype`` narrow them); the rows are merged into the per-user
table (``--table-file PATH``: another, e.g. the repository's ``kernels/attention_table.json``)
under this host's class (CPU ISA or GPU name, torch version), where ``attention.backend=auto``
finds them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import statistics
import sys
import tempfile
import time
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


# Shapes of the table: MCF's sequence lengths (ViT-*/16 at 112 px: 13 visible + class for the
# encoders at 75 % masking, 50 for the decoder and teacher; at 224 px: 50 and 197) and head
# dimensions (64: the ViT encoders and teachers; 32: the MAE decoder, 512 wide with 16 heads).
TABLE_SHAPES = {"tokens": (13, 50, 197), "head_dim": (32, 64), "dtype": ("bfloat16", "float32")}
TABLE_SIZES = {"cpu": {"batch": 32, "heads": 12, "warmup": 2, "repeats": 7, "inner": 1},
               "cuda": {"batch": 256, "heads": 16, "warmup": 5, "repeats": 20, "inner": 5}}


def _option(argv: list[str], flag: str) -> list[str] | None:
    """The values after ``flag`` in ``argv`` (up to the next flag), None when absent."""
    if flag not in argv:
        return None
    i = argv.index(flag) + 1
    values = []
    while i < len(argv) and not argv[i].startswith("--"):
        values.append(argv[i])
        i += 1
    return values


def _time_interleaved(
    backends: list[str], inputs: tuple, device, warmup: int, repeats: int, inner: int
) -> dict[str, list[float]]:
    """ms per forward + backward of each backend; the backends alternate within every repeat, so a
    shared host's load falls on all alike. CPU: process CPU time (all threads), steadier than wall
    time when other processes share the cores; GPU: wall time between synchronisations."""
    import torch

    from mcf.measure import sync
    from mcf.models.attention import candidate

    q, k, v, dout = inputs
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    times: dict[str, list[float]] = {b: [] for b in backends}
    for _ in range(warmup):
        for b in backends:
            torch.autograd.grad(candidate(b)(*leaves, None), leaves, dout)
    for _ in range(repeats):
        for b in backends:
            fn = candidate(b)
            sync(device)
            t0 = clock()
            for _ in range(inner):
                torch.autograd.grad(fn(*leaves, None), leaves, dout)
            sync(device)
            times[b].append((clock() - t0) * 1e3 / inner)
    return times


def run_table(argv: list[str]) -> dict[str, Any]:
    """``--table``: measure the candidates, merge the rows into the table (see the module doc)."""
    import torch

    from mcf.bench.common import run_info
    from mcf.kernels.dispatch import host_class, rows_from_bench, triton_status, user_table_path, write_table
    from mcf.measure import device_name, resolve_device

    bench = load_bench_attention()
    device = resolve_device((_option(argv, "--device") or ["auto"])[0])
    sizes = TABLE_SIZES["cuda" if device.type == "cuda" else "cpu"]

    def ints(flag: str, default: tuple[int, ...] | int) -> tuple[int, ...]:
        given = _option(argv, flag)
        return tuple(int(v) for v in given) if given else (default if isinstance(default, tuple) else (default,))

    dtypes = tuple(_option(argv, "--dtype") or TABLE_SHAPES["dtype"])
    backends = ["sdpa", "sdpa_fp32", "math"] + (
        ["triton"] if device.type == "cuda" and triton_status(device)[0] else []
    )
    timing = {k: int((_option(argv, f"--{k}") or [sizes[k]])[0]) for k in ("warmup", "repeats", "inner")}
    generator = torch.Generator().manual_seed(0)
    results = []
    for dtype in dtypes:
        for head_dim in ints("--head-dim", TABLE_SHAPES["head_dim"]):
            for B in ints("--batch", sizes["batch"]):
                for H in ints("--heads", sizes["heads"]):
                    for S in ints("--tokens", TABLE_SHAPES["tokens"]):
                        q, k, v, dout, _ = bench._inputs(
                            B, H, S, head_dim, bench.DTYPES[dtype], device, False, generator
                        )
                        ms = _time_interleaved(backends, (q, k, v, dout), device, **timing)
                        for backend, times in ms.items():
                            row = {
                                "B": B, "H": H, "S": S, "D": head_dim, "dtype": dtype, "masked": False,
                                "backend": backend, "mode": "fwd+bwd", "median_ms": statistics.median(times),
                                "times_ms": times,
                            }
                            results.append(row)
                            print(bench._format_row({**row, "tflops": 0.0}), file=sys.stderr)
    info = run_info(device)
    host = host_class(device)
    source = f"mcf bench attention --table, {info['date']}, commit {info['commit']}, {device_name(device)}"
    rows = rows_from_bench(results, source)
    given = _option(argv, "--table-file")
    path = write_table(Path(given[0]) if given else user_table_path(), host, rows)
    choices = {f"{r['dtype']} S{r['tokens']} D{r['head_dim']}": min((c for c in r["ms"] if r["ms"][c] is not None),
                                                                   key=lambda c: r["ms"][c]) for r in rows}
    print(f"attention table {path}: {len(rows)} rows for {host}", file=sys.stderr)
    return {
        "benchmark": "attention", "device": device_name(device),
        "table": {"host": host, "path": str(path), "rows": rows, "fastest": choices}, "results": results,
        "dtypes": list(dtypes),
        "timing": {**timing, "clock": "wall" if device.type == "cuda" else "process CPU time", "order": "interleaved"},
        **info,
    }


def run(argv: list[str]) -> dict[str, Any]:
    import torch

    from mcf.bench.common import run_info
    from mcf.measure import device_name, resolve_device

    argv = [a for a in argv if a != "--"]
    if "--table" in argv:
        return run_table(argv)
    if "--table-file" in argv:
        raise UserError("--table-file goes with --table")
    bench = load_bench_attention()
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
    return {
        "benchmark": "attention", "device": device_name(device), **result, "suggested_rows": rows, **run_info(device)
    }


def main(argv: list[str], out: str | None = None) -> int:
    emit(run(argv), out)
    return 0
