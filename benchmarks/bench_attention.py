"""Attention at MCF's shapes: Triton (mcf.kernels) vs SDPA vs math (the reference), fwd and fwd+bwd.

MCF's encoder sees 50 tokens (25 % of 196 patches + class token) and its decoder and teacher 197.
At these lengths library attention is hard to beat, so ``attention.backend=auto`` uses the Triton
kernel only where this benchmark measured it faster (``mcf.kernels.dispatch.TRITON_FASTER``); the
rows to paste there are printed at the end of a run.

    python benchmarks/bench_attention.py --tiny               # CPU smoke test (the default without a GPU)
    python benchmarks/bench_attention.py --json bench.json    # full MCF shapes (the default on a GPU)

Timing: ``warmup`` untimed calls, then ``repeats`` timed groups of ``inner`` calls, each group
between two device synchronisations; the median group time per call is reported. Masked shapes use
a per-sample key-padding mask with 60-100 % valid keys (the variable mask-ratio setting).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch
from mcf.kernels import triton_status

from mcf.models.attention import candidate

BACKENDS = ("triton", "sdpa", "sdpa_fp32", "math")  # sdpa_fp32: SDPA on fp32 casts of the inputs, cast back
MODES = ("fwd", "fwd+bwd")
FULL = dict(
    batch=(64, 256), heads=(12, 16), tokens=(50, 197), head_dim=64, masked=(False, True), dtype="bfloat16", warmup=5,
    repeats=20, inner=5,
)
TINY = dict(
    batch=(2,), heads=(2,), tokens=(20,), head_dim=32, masked=(False, True), dtype="float32", warmup=1, repeats=2,
    inner=1,
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _attention_fn(backend: str) -> Callable:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
    return candidate(backend)  # the same functions attention.backend runs


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int, inner: int) -> list[float]:
    """Milliseconds per call of ``fn``, one value per timed group of ``inner`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        _synchronize(device)
        times.append((time.perf_counter() - start) * 1e3 / inner)
    return times


def _inputs(
    B: int, H: int, S: int, D: int, dtype: torch.dtype, device: torch.device, masked: bool, generator: torch.Generator
):
    # [B, S, H, D] viewed as [B, H, S, D]: the layout a fused qkv projection produces
    q, k, v, dout = (
        torch.randn(B, S, H, D, generator=generator, device="cpu").to(device=device, dtype=dtype).transpose(1, 2)
        for _ in range(4)
    )
    mask = None
    if masked:
        lens = torch.randint(math.ceil(0.6 * S), S + 1, (B,), generator=generator)
        mask = (torch.arange(S)[None, :] < lens[:, None]).to(device)
    return q, k, v, dout, mask


def run(
    *,
    batch: Sequence[int] = FULL["batch"],
    heads: Sequence[int] = FULL["heads"],
    tokens: Sequence[int] = FULL["tokens"],
    head_dim: int = FULL["head_dim"],
    masked: Sequence[bool] = FULL["masked"],
    dtype: str = FULL["dtype"],
    device: str | torch.device | None = None,
    backends: Sequence[str] = BACKENDS,
    modes: Sequence[str] = MODES,
    warmup: int = FULL["warmup"],
    repeats: int = FULL["repeats"],
    inner: int = FULL["inner"],
    min_speedup: float = 1.1,
    seed: int = 0,
    log: Callable[[str], None] | None = print,
) -> dict:
    """Time every (shape, backend, mode); return the results as a JSON-ready dict.

    Returns:
        ``{"meta": {...}, "results": [row, ...], "triton_faster": [...]}``; a row holds the shape,
        ``backend``, ``mode``, ``median_ms``, ``times_ms``, ``tflops`` (attention matmul FLOPs
        only), or ``error`` when that backend cannot run there (e.g. Triton on a CPU without the
        interpreter). ``triton_faster`` lists the shapes where Triton's fwd+bwd beat SDPA by at
        least ``min_speedup``: the candidates for ``TRITON_FASTER``.
    """
    device = (
        torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    for b in backends:
        _attention_fn(b)
    for m in modes:
        if m not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {m!r}")
    torch_dtype = DTYPES[dtype]
    generator = torch.Generator().manual_seed(seed)
    triton_ok, triton_reason = triton_status(device)
    meta = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": _triton_version(),
        "triton_status": triton_reason,
        "dtype": dtype,
        "warmup": warmup,
        "repeats": repeats,
        "inner": inner,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    results = []
    for B in batch:
        for H in heads:
            for S in tokens:
                for is_masked in masked:
                    q, k, v, dout, mask = _inputs(B, H, S, head_dim, torch_dtype, device, is_masked, generator)
                    for backend in backends:
                        attn = _attention_fn(backend)
                        for mode in modes:
                            row = {
                                "B": B, "H": H, "S": S, "D": head_dim, "dtype": dtype, "masked": is_masked,
                                "backend": backend, "mode": mode,
                            }
                            if backend == "triton" and not triton_ok:
                                row["error"] = triton_reason
                            else:
                                row.update(_measure(attn, q, k, v, dout, mask, mode, device, warmup, repeats, inner))
                            results.append(row)
                            if log is not None:
                                log(_format_row(row))
                    del q, k, v, dout, mask
    out = {"meta": meta, "results": results, "triton_faster": triton_faster(results, meta["device_name"], min_speedup)}
    if log is not None and device.type == "cuda":
        log(suggested_rows(out))
    return out


def _measure(attn, q, k, v, dout, mask, mode, device, warmup, repeats, inner) -> dict:
    B, H, S, D = q.shape
    flops = 4 * B * H * S * S * D * (1 if mode == "fwd" else 3.5)  # QK^T and PV; bwd = 2.5 x fwd (5 matmuls)
    if mode == "fwd":
        def step():
            with torch.no_grad():
                attn(q, k, v, mask)
    else:
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]

        def step():
            torch.autograd.grad(attn(*leaves, mask), leaves, dout)
    try:
        times = time_call(step, device, warmup, repeats, inner)
    except (RuntimeError, torch.cuda.OutOfMemoryError) as e:  # out of memory, or a kernel that cannot run here
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
    median = statistics.median(times)
    return {"median_ms": median, "times_ms": times, "tflops": flops / (median * 1e-3) / 1e12}


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def triton_faster(results: list[dict], device_name: str, min_speedup: float) -> list[dict]:
    """Shapes where Triton's fwd+bwd median beat SDPA's by ``min_speedup`` (SDPA ms / Triton ms)."""
    by_key = {(r["B"], r["H"], r["S"], r["D"], r["dtype"], r["masked"], r["backend"], r["mode"]): r for r in results}
    wins = []
    for (B, H, S, D, dtype, masked, backend, mode), row in by_key.items():
        if backend != "triton" or mode != "fwd+bwd" or "median_ms" not in row:
            continue
        sdpa = by_key.get((B, H, S, D, dtype, masked, "sdpa", mode))
        if sdpa is None or "median_ms" not in sdpa:
            continue
        speedup = sdpa["median_ms"] / row["median_ms"]
        if speedup >= min_speedup:
            wins.append(
                {
                    "device": device_name, "dtype": dtype, "head_dim": D, "tokens": S, "masked": masked, "B": B, "H": H,
                    "speedup": round(speedup, 3),
                }
            )
    return wins


def suggested_rows(out: dict) -> str:
    """``TritonFaster(...)`` lines for ``mcf.kernels.dispatch.TRITON_FASTER`` (shapes won at every B and H)."""
    groups: dict[tuple, list[dict]] = {}
    for w in out["triton_faster"]:
        groups.setdefault((w["device"], w["dtype"], w["head_dim"], w["tokens"], w["masked"]), []).append(w)
    tried = {
        (r["dtype"], r["D"], r["S"], r["masked"]): set()
        for r in out["results"]
        if r["backend"] == "triton" and r["mode"] == "fwd+bwd"
    }
    for r in out["results"]:
        if r["backend"] == "triton" and r["mode"] == "fwd+bwd":
            tried[(r["dtype"], r["D"], r["S"], r["masked"])].add((r["B"], r["H"]))
    lines = ["# rows for mcf.kernels.dispatch.TRITON_FASTER (Triton fwd+bwd faster than SDPA at every measured B, H):"]
    for (device, dtype, D, S, masked), wins in sorted(groups.items()):
        if {(w["B"], w["H"]) for w in wins} != tried[(dtype, D, S, masked)]:
            continue
        speedup = min(w["speedup"] for w in wins)
        lines.append(
            f'TritonFaster(device="{device}", dtype=torch.{dtype}, head_dim={D}, min_tokens={S}, max_tokens={S}, '
            f'masked={masked}, speedup={speedup}, source="bench_attention {out["meta"]["date"]}"),'
        )
    if len(lines) == 1:
        lines.append("# none: keep TRITON_FASTER empty (auto = SDPA)")
    return "\n".join(lines)


def _format_row(row: dict) -> str:
    shape = (
        f"B{row['B']:<4} H{row['H']:<3} S{row['S']:<4} D{row['D']:<4} {row['dtype']:<9} "
        f"{'masked' if row['masked'] else 'full  '}"
    )
    if "error" in row:
        return f"{shape} {row['backend']:<7} {row['mode']:<8} n/a ({row['error']})"
    return (
        f"{shape} {row['backend']:<7} {row['mode']:<8} {row['median_ms']:9.3f} ms  {row['tflops'] * 1e3:9.1f} GFLOP/s"
    )


def to_markdown(out: dict) -> str:
    """A results table (one line per shape and mode; ms per call, Triton's speedup over SDPA)."""
    meta = out["meta"]
    lines = [
        f"Attention, {meta['device_name']}, torch {meta['torch']}, triton {meta['triton']}, {meta['dtype']}, "
        f"{meta['date']}",
        "(median of {repeats} groups of {inner} calls after {warmup} warm-up calls)".format(**meta),
        "",
        "| B | H | S | D | mask | mode | triton ms | sdpa ms | math ms | sdpa / triton |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows: dict[tuple, dict[str, dict]] = {}
    for r in out["results"]:
        rows.setdefault((r["B"], r["H"], r["S"], r["D"], r["masked"], r["mode"]), {})[r["backend"]] = r
    for (B, H, S, D, masked, mode), by_backend in rows.items():
        ms = {b: by_backend[b].get("median_ms") if b in by_backend else None for b in BACKENDS}
        cells = [f"{ms[b]:.3f}" if ms[b] is not None else "n/a" for b in BACKENDS]
        ratio = f"{ms['sdpa'] / ms['triton']:.2f}" if ms["sdpa"] and ms["triton"] else "n/a"
        lines.append(
            f"| {B} | {H} | {S} | {D} | {'yes' if masked else 'no'} | {mode} | " + " | ".join(cells) + f" | {ratio} |"
        )
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke test; the default without a GPU)")
    size.add_argument("--full", action="store_true", help="MCF shapes (the default on a GPU)")
    p.add_argument("--batch", type=int, nargs="+", help="batch sizes")
    p.add_argument("--heads", type=int, nargs="+", help="head counts")
    p.add_argument("--tokens", type=int, nargs="+", help="sequence lengths")
    p.add_argument("--head-dim", type=int, help="head dimension")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="input dtype")
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--device", help="device (default: cuda if available, else cpu)")
    p.add_argument("--warmup", type=int)
    p.add_argument("--repeats", type=int)
    p.add_argument("--inner", type=int, help="calls per timed group")
    p.add_argument("--min-speedup", type=float, default=1.1, help="SDPA/Triton ratio that counts as a Triton win")
    p.add_argument("--json", metavar="OUT", help="write the results as JSON to OUT")
    p.add_argument("--markdown", metavar="OUT", help="write a markdown table to OUT")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    device = torch.device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = TINY if args.tiny or (not args.full and device.type != "cuda") else FULL
    overrides = {
        "batch": args.batch, "heads": args.heads, "tokens": args.tokens, "head_dim": args.head_dim, "dtype": args.dtype,
        "warmup": args.warmup, "repeats": args.repeats, "inner": args.inner,
    }
    config = {**preset, **{k: v for k, v in overrides.items() if v is not None}}
    out = run(**config, device=device, backends=args.backends, modes=args.modes, min_speedup=args.min_speedup)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(to_markdown(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
