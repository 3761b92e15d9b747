"""Memory and time of the epoch order per loader worker: the explicit permutation (before) vs the
Feistel order computed per index (``mcf.data.core.sampler``, after), at 1M and 20M samples.

Each measurement runs in a fresh spawned process, as a DALI source worker starts: it receives the
pickled sampler, then produces the indices of one batch of rank 0 of 8 near the end of epoch 3
(what a worker must do for any batch). Reported: resident memory added (VmRSS after minus before,
after numpy's one-time costs; the explicit permutation keeps the rank's share, ``n / 8`` int64),
``peak_mb`` (VmHWM of the whole process: the full ``n`` int64 permutation is a temporary), and the
time of that first batch (the permutation is built then), of the following ones, and of all the
indices of the rank's epoch (``n / 8``, in the sampler's chunks, as the rank's DataLoader iterates).

    python benchmarks/bench_sampler.py [--sizes 1000000 20000000] [--batch 256] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import pickle
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from mcf.data.core.sampler import CHUNK, DistributedSampler  # noqa: E402

RANK, WORLD, EPOCH = 0, 8, 3


class ExplicitPermutationSampler:
    """The sampler before this change (its ``indices``): one ``default_rng((seed, epoch)).permutation(n)``
    per epoch, dealt round-robin, cached as int64 in every process that asks for an index."""

    def __init__(self, n: int, *, rank: int, world_size: int, seed: int = 0):
        self.n, self.rank, self.world_size, self.seed = n, rank, world_size, seed
        self._cache = None

    def take(self, epoch: int, offset: int, start: int, stop: int) -> np.ndarray:
        if self._cache is None or self._cache[0] != epoch:
            order = np.random.default_rng([self.seed & 0xFFFFFFFF, epoch, 0x73616D70]).permutation(self.n)
            per_rank = self.n // self.world_size
            self._cache = (epoch, order[: per_rank * self.world_size][self.rank :: self.world_size].astype(np.int64))
        first = (offset - self.rank) // self.world_size  # the old per-rank position of a global offset
        return self._cache[1][first + start : first + stop]


def _status(key: str) -> float:
    """VmRSS / VmHWM of this process in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def _worker(blob: bytes, batch: int, queue: mp.Queue) -> None:
    sampler = pickle.loads(blob)
    type(sampler)(1000, rank=0, world_size=1).take(
        0, 0, 0, 100
    )  # one-time costs (numpy's first calls) before the baseline
    rss0 = _status("VmRSS")
    n = sampler.n if hasattr(sampler, "n") else sampler.num_samples
    offset = (n // WORLD // batch - 2) * batch * WORLD  # two batches before the end of the epoch
    t0 = time.perf_counter()
    first = sampler.take(EPOCH, offset, 0, batch)
    t1 = time.perf_counter()
    assert len(first) == batch
    times = []
    for k in range(50):  # other batches of the epoch, median time
        t = time.perf_counter()
        sampler.take(EPOCH, k * batch * WORLD, 0, batch)
        times.append(time.perf_counter() - t)
    rss1 = _status("VmRSS")
    t3 = time.perf_counter()
    share = n // WORLD
    for start in range(0, share, CHUNK):  # the rank's whole epoch, as the rank's sampler iterates it
        sampler.take(EPOCH, 0, start, min(start + CHUNK, share))
    queue.put({"rss_added_mb": rss1 - rss0, "peak_mb": _status("VmHWM"), "base_mb": rss0,
               "first_batch_s": t1 - t0, "next_batch_ms": float(np.median(times)) * 1e3, "pickled_bytes": len(blob),
               "rank_epoch_s": time.perf_counter() - t3})


def measure(sampler: object, batch: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=_worker, args=(pickle.dumps(sampler), batch, queue))
    p.start()
    out = queue.get(timeout=600)
    p.join()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 20_000_000])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    for n in args.sizes:
        for name, sampler in (
            ("explicit permutation (before)", ExplicitPermutationSampler(n, rank=RANK, world_size=WORLD)),
            ("feistel (after)", DistributedSampler(n, rank=RANK, world_size=WORLD)),
        ):
            r = measure(sampler, args.batch)
            rows.append({"n": n, "sampler": name, **r, "bytes_per_sample": r["rss_added_mb"] * 2**20 / n})
            print(json.dumps(rows[-1]), flush=True)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
    ).stdout.strip()
    flags = Path("/proc/cpuinfo").read_text()
    info = {
        "commit": commit, "python": platform.python_version(), "numpy": np.__version__,
        "avx512_bf16": "avx512_bf16" in flags, "avx2": "avx2" in flags, "batch": args.batch, "rank": RANK,
        "world": WORLD,
    }
    if args.out:
        Path(args.out).write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    print(
        "| samples | order | RSS added per worker | per sample | peak RSS | first batch | next batches | rank's epoch |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['n']:,} | {r['sampler']} | {r['rss_added_mb']:.1f} MB | {r['bytes_per_sample']:.2f} B | "
            f"{r['peak_mb']:.0f} MB | {r['first_batch_s'] * 1e3:.1f} ms | {r['next_batch_ms']:.2f} ms | "
            f"{r['rank_epoch_s']:.2f} s |"
        )


if __name__ == "__main__":
    main()
