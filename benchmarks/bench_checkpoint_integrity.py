"""What checkpoint integrity costs: writing one file through mcf's CheckpointWriter with and without
SHA-256 hashing while writing (``checkpoint.hash``), the content scan every resume does (the pickle
record only), and the full SHA-256 read that checking a hashed marker does.

    python benchmarks/bench_checkpoint_integrity.py --mib 512 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from mcf.serialization import check_file, safe_globals
from mcf.train import integrity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=512, help="size of the one fp32 tensor saved")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    args = parser.parse_args()
    safe_globals()  # imports DeepSpeed's types once, outside the timings
    state = {"w": torch.randn(args.mib * 2**20 // 4)}
    result: dict[str, list[float]] = {"write_s": [], "write_hashed_s": [], "scan_s": [], "sha256_read_s": []}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "x.pt"
        for _ in range(args.repeats):
            for key, hashed in (("write_s", False), ("write_hashed_s", True)):
                writer = integrity.CheckpointWriter(None)
                writer.begin(hashed)
                t = time.perf_counter()
                writer.write(state, path)
                result[key].append(time.perf_counter() - t)
                assert writer.error is None, writer.error
            t = time.perf_counter()
            check_file(path)
            result["scan_s"].append(time.perf_counter() - t)
            t = time.perf_counter()
            integrity._sha256(path)
            result["sha256_read_s"].append(time.perf_counter() - t)
    print(json.dumps({"mib": args.mib, **{k: round(min(v), 4) for k, v in result.items()}}))


if __name__ == "__main__":
    main()
