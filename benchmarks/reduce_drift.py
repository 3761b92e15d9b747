"""How far do bf16 gradient sums across ranks drift from fp32 sums? (``deepspeed.reduce_dtype``)

Runs ``mcf pretrain`` on the demo preset three times with 2 ranks (torchrun, gloo on the CPU,
``OMP_NUM_THREADS=1`` so bf16 is bit-reproducible run to run): bf16 training with fp32 reduction
(the default), bf16 training with bf16 reduction, and fp32 training (the scale of what bf16
training itself changes). Compares per-step losses and the final fp32 weights (online masters and
EMA target) as relative differences, and prints one JSON object.

    python benchmarks/reduce_drift.py --steps 300 --zero 1 --out drift.json
    python benchmarks/reduce_drift.py --steps 300 --zero 3 --no-fp32-training
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(out: Path, steps: int, zero: int, precision: str, reduce_dtype: str, nproc: int) -> float:
    env = dict(
        os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", MLFLOW_DISABLE_TELEMETRY="true", PYTHONUNBUFFERED="1"
    )
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
        str(free_port()), "-m", "mcf", "pretrain", "--config", "demo", "--output-dir", str(out), "--max-steps",
        str(steps), "--log-every", "1", "--tracking-uri", "none", "--loader", "torch", "--zero", str(zero),
        "--precision", precision, "--set", f"deepspeed.reduce_dtype={reduce_dtype}", "--set", "logging.progress=false",
        "--set", "data.num_workers=0", "--set", "logging.recon_every=0", "--checkpoint-every", str(steps),
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"run {out.name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def losses(out: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]


def rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """‖a − b‖ / ‖a‖ over all tensors together."""
    num = sum(float((a[k].detach().double() - b[k].detach().double()).square().sum()) for k in a)
    den = sum(float(a[k].detach().double().square().sum()) for k in a)
    return (num / den) ** 0.5


def compare(ref: Path, other: Path) -> dict[str, float]:
    from mcf.train.checkpoint import load_consolidated

    la, lb = losses(ref), losses(other)
    d = [abs(x - y) / abs(x) for x, y in zip(la, lb)]
    ca, cb = load_consolidated(ref), load_consolidated(other)
    return {"loss_rel_diff_max": max(d), "loss_rel_diff_mean": sum(d) / len(d), "loss_rel_diff_last": d[-1],
            "final_loss": lb[-1], "online_weights_rel_diff": rel(ca["online"], cb["online"]),
            "target_weights_rel_diff": rel(ca["target"], cb["target"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--zero", type=int, default=1)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--no-fp32-training", action="store_true", help="skip the fp32-training run (the scale reference)")
    p.add_argument("--out", default=None, help="JSON file")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="mcf-drift-") as tmp:
        runs = {"bf16_reduce_fp32": ("bf16", "fp32"), "bf16_reduce_bf16": ("bf16", "bf16")}
        if not args.no_fp32_training:
            runs["fp32"] = ("fp32", "fp32")
        seconds = {name: run(Path(tmp) / name, args.steps, args.zero, *pr, args.nproc) for name, pr in runs.items()}
        ref = Path(tmp) / "bf16_reduce_fp32"
        result = {
            "steps": args.steps,
            "zero": args.zero,
            "nproc": args.nproc,
            "reference": "bf16 training, fp32 reduction",
            "final_loss_reference": losses(ref)[-1],
            "seconds": seconds,
            "bf16_reduction": compare(ref, Path(tmp) / "bf16_reduce_bf16"),
        }
        if "fp32" in runs:
            result["fp32_training"] = compare(ref, Path(tmp) / "fp32")
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
