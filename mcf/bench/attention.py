"""``mcf bench attention``: runs ``benchmarks/bench_attention.py`` (the kernels' benchmark, owned
with the kernels) and reports its JSON with this run's date, commit and device added.

Arguments after ``attention`` pass through unchanged (``--tiny``, ``--full``, ``--batch 64`` ...): that mode has
no config of its own.

``--table`` fills the attention dispatch table instead (``mcf.kernels.dispatch``): every candidate
path (``sdpa``, ``sdpa_fp32``, ``math``; ``triton`` where it can run on the device), forward +
backward, in bf16 and fp32, at MCF's sequence lengths and head dimensions; its settings are the keys of
:class:`~mcf.bench.config.AttentionTableConfig` (``mcf config --list --command bench-attention``;
``--batch/--heads/--tokens/--head-dim/--dtype`` set them, as do ``--config`` and ``--set``); the rows are merged
into the per-user table (``--table-file PATH``: another, e.g. the repository's ``kernels/attention_table.json``)
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
from mcf.bench.config import AttentionTableConfig
from mcf.errors import UserError

BENCH_FILE = REPO_ROOT / "benchmarks" / "bench_attention.py"


def load_bench_attention(path: Path = BENCH_FILE) -> ModuleType:
    if not path.is_file():
        raise UserError(f"{path} not found: `mcf bench attention` runs the kernels' benchmark from a source checkout")
    spec = importlib.util.spec_from_file_location("bench_attention", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


# Shapes of the table: AttentionTableConfig's defaults (MCF's sequence lengths and head dimensions, its docstring).
_TABLE = AttentionTableConfig()
TABLE_SHAPES = {"tokens": _TABLE.tokens, "head_dim": _TABLE.head_dim, "dtype": _TABLE.dtypes}
# the sizes a config leaves at None, per device type
TABLE_SIZES = {"cpu": {"batch": 32, "heads": 12, "warmup": 2, "repeats": 7, "inner": 1},
               "cuda": {"batch": 256, "heads": 16, "warmup": 5, "repeats": 20, "inner": 5}}


def _time_interleaved(
    backends: list[str], inputs: tuple, device, warmup: int, repeats: int, inner: int, clock: str = "wall"
) -> dict[str, list[float]]:
    """ms per forward + backward of each backend; the backends alternate within every repeat, so a
    shared host's load falls on all alike. ``clock``: ``wall`` (between synchronisations on a GPU), or on a
    CPU ``cpu``, process CPU time (all threads): steadier when other processes share the cores, but it
    charges a kernel that runs on two threads for both, where a step pays its wall time."""
    import torch

    from mcf.measure import sync
    from mcf.models.attention import candidate

    q, k, v, dout = inputs
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    clock_fn = time.process_time if clock == "cpu" and device.type != "cuda" else time.perf_counter
    times: dict[str, list[float]] = {b: [] for b in backends}
    for _ in range(warmup):
        for b in backends:
            torch.autograd.grad(candidate(b)(*leaves, None), leaves, dout)
    for _ in range(repeats):
        for b in backends:
            fn = candidate(b)
            sync(device)
            t0 = clock_fn()
            for _ in range(inner):
                torch.autograd.grad(fn(*leaves, None), leaves, dout)
            sync(device)
            times[b].append((clock_fn() - t0) * 1e3 / inner)
    return times


def run_table(cfg: AttentionTableConfig) -> dict[str, Any]:
    """``--table``: measure the candidates, merge the rows into the table (see the module doc)."""
    import torch

    from mcf.bench.common import run_info
    from mcf.kernels.dispatch import host_class, rows_from_bench, triton_status, user_table_path, write_table
    from mcf.measure import device_name, resolve_device

    bench = load_bench_attention()
    device = resolve_device(cfg.device)
    sizes = TABLE_SIZES["cuda" if device.type == "cuda" else "cpu"]
    batches, heads = cfg.batch or (sizes["batch"],), cfg.heads or (sizes["heads"],)
    dtypes = cfg.dtypes
    backends = ["sdpa", "sdpa_fp32", "math"] + (
        ["triton"] if device.type == "cuda" and triton_status(device)[0] else []
    )
    timing = {k: sizes[k] if getattr(cfg, k) is None else getattr(cfg, k) for k in ("warmup", "repeats", "inner")}
    clock = "wall" if device.type == "cuda" else cfg.clock
    generator = torch.Generator().manual_seed(0)
    results = []
    for dtype in dtypes:
        for head_dim in cfg.head_dim:
            for B in batches:
                for H in heads:
                    for S in cfg.tokens:
                        q, k, v, dout, _ = bench._inputs(
                            B, H, S, head_dim, bench.DTYPES[dtype], device, False, generator
                        )
                        ms = _time_interleaved(backends, (q, k, v, dout), device, **timing, clock=clock)
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
    source = (f"mcf bench attention --table, {info['date']}, commit {info['commit']}, {device_name(device)}, "
              f"{clock} clock")
    rows = rows_from_bench(results, source)
    path = write_table(Path(cfg.table_file) if cfg.table_file else user_table_path(), host, rows)
    choices = {f"{r['dtype']} S{r['tokens']} D{r['head_dim']}": min((c for c in r["ms"] if r["ms"][c] is not None),
                                                                   key=lambda c: r["ms"][c]) for r in rows}
    print(f"attention table {path}: {len(rows)} rows for {host}", file=sys.stderr)
    return {
        "benchmark": "attention", "device": device_name(device),
        "table": {"host": host, "path": str(path), "rows": rows, "fastest": choices}, "results": results,
        "dtypes": list(dtypes),
        "timing": {**timing, "clock": "wall" if clock == "wall" else "process CPU time", "order": "interleaved"},
        **info,
    }


def run(argv: list[str]) -> dict[str, Any]:
    """The pass-through mode: ``argv`` are benchmarks/bench_attention.py's arguments (``--table`` is
    :func:`run_table`'s, with its config)."""
    import torch

    from mcf.bench.common import run_info
    from mcf.measure import device_name, resolve_device

    argv = [a for a in argv if a != "--"]
    if "--table" in argv or "--table-file" in argv:
        raise UserError("--table runs with its config (`mcf bench attention --table`); --table-file goes with --table")
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
