"""``mcf bench data --index-scale N``: open time and memory per sample of mcf's data indexes at scale.

Synthetic data, cheap to make (see :mod:`mcf.bench.data`): N 13-character keys in a key file plus a
tiny LMDB of the paper's layout; a folder of empty ``.jpg`` files (1,000 a directory); a shard index
of N samples over fake 10,000-sample shards. Memory is read from ``/proc/<pid>/smaps_rollup``:
``rss`` (resident, file pages included), ``private_dirty`` (pages this process wrote: what
reference counts make a forked worker copy). ``resident_per_sample_reading_all`` is the resident
growth from reading every page of the index (shared page-cache pages: the cost per node, not per
process); ``private_per_sample_total`` is what the process itself wrote (build temporaries included
on a first open). ``dataset_reopen_s`` times the whole paper-layout data set (index + LMDB checks)
in a forked child, whose first LMDB open runs a garbage collection over what it inherited.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from mcf.bench.config import IndexScaleConfig

KEY_LEN = 13  # "k" + 12 digits, as the paper's layout (13-character keys)
FILES_PER_DIR = 1000
SHARD_SAMPLES = 10_000


def memory(pid: int | str = "self") -> dict[str, int]:
    """``rss``, ``pss``, ``private_dirty``, ``anonymous`` bytes of a process (Linux smaps_rollup)."""
    out = {}
    names = {"Rss:": "rss", "Pss:": "pss", "Private_Dirty:": "private_dirty", "Anonymous:": "anonymous"}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        parts = line.split()
        if parts and parts[0] in names:
            out[names[parts[0]]] = int(parts[1]) * 1024
    return out


def make_key_file(path: Path, n: int) -> None:
    """``n`` lines ``k%012d`` (13 characters), written in 1M-line blocks."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        for a in range(0, n, 1_000_000):
            v = np.arange(a, min(n, a + 1_000_000), dtype=np.int64)
            buf = np.empty((len(v), KEY_LEN + 1), dtype=np.uint8)
            buf[:, 0], buf[:, -1] = ord("k"), ord("\n")
            for d in range(KEY_LEN - 1, 0, -1):
                buf[:, d] = 48 + v % 10
                v //= 10
            f.write(buf.tobytes())
    old = time.time() - 3600  # older than the index's "too recent to trust" window
    os.utime(tmp, (old, old))
    os.replace(tmp, path)


def make_paper_lmdb(db: Path, keys_file: Path, n: int) -> None:
    """A tiny LMDB of the paper's layout for a key file of ``n`` keys: ``length`` = n, and one small
    JPEG under the first and the last key (all a dataset checks at open)."""
    import io

    import lmdb
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 120, 200)).save(buf, format="JPEG")
    first, last = b"k%012d" % 0, b"k%012d" % (n - 1)
    env = lmdb.open(str(db), map_size=1 << 24)
    with env.begin(write=True) as txn:
        txn.put(b"length", str(n).encode())
        txn.put(first, buf.getvalue())
        txn.put(last, buf.getvalue())
    env.close()


def _in_child(fn, *args) -> Any:
    """Run ``fn(*args)`` in a forked child (clean memory accounting) and return its result."""
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)

    def target():
        try:
            child.send(fn(*args))
        except BaseException as e:  # reported to the parent, never hangs it
            child.send({"error": f"{type(e).__name__}: {e}"})

    p = ctx.Process(target=target)
    p.start()
    result = parent.recv()
    p.join()
    return result


def _open_paper(db: Path, keys_file: Path, cache: Path):
    from mcf.data.core.index import IndexOptions
    from mcf.data.formats.datasets import PaperLMDBDataset

    return PaperLMDBDataset(db, keys_file, index=IndexOptions(cache_dir=str(cache)))


def _touch(arrays) -> None:
    for a in arrays:
        int(np.asarray(a).view(np.uint8).sum(dtype=np.uint64))  # every page read once


def _open_measure(open_fn, n: int, arrays_of) -> dict[str, Any]:
    """In this (child) process: open time, resident bytes per sample after opening and after reading
    every page of the index."""
    import gc

    gc.collect()  # a forked child's first collection writes to every object it inherited: not the index's doing
    m0 = memory()
    t0 = time.perf_counter()
    obj = open_fn()
    dt = time.perf_counter() - t0
    m1 = memory()
    _touch(arrays_of(obj))
    m2 = memory()
    return {
        "open_s": dt,
        "rss_growth_at_open_bytes": m1["rss"] - m0["rss"],
        "resident_per_sample_reading_all": (m2["rss"] - m1["rss"]) / n,
        "private_per_sample_total": (m2["private_dirty"] - m0["private_dirty"]) / n,
    }


def _worker_epoch(read, k: int) -> dict[str, Any]:
    """In a forked worker: private (copy-on-write) bytes gained by reading ``k`` entries with ``read``."""
    import gc

    gc.collect()
    m0 = memory()
    t0 = time.perf_counter()
    for i in range(k):
        read(i)
    dt = time.perf_counter() - t0
    m1 = memory()
    return {
        "private_dirty_growth_per_key": (m1["private_dirty"] - m0["private_dirty"]) / k,
        "rss_growth_per_key": (m1["rss"] - m0["rss"]) / k,
        "seconds": dt,
    }


def _preload() -> None:
    """Import what opening a data set imports, so the children's memory deltas are the index alone."""
    import lmdb  # noqa: F401
    import PIL.Image  # noqa: F401

    import mcf.data.formats.datasets  # noqa: F401
    import mcf.data.formats.shards  # noqa: F401


def keys_bench(work: Path, n: int, worker_keys: int) -> dict[str, Any]:
    kf, db, cache = work / f"keys{n}.txt", work / f"paper{n}", work / "cache-keys"
    if not kf.exists():
        make_key_file(kf, n)
    if not db.exists():
        make_paper_lmdb(db, kf, n)
    shutil.rmtree(cache, ignore_errors=True)
    from mcf.data.core.index import IndexOptions, open_key_list

    opts = IndexOptions(cache_dir=str(cache))
    arrays = lambda keys: (keys.offsets, keys.blob)  # noqa: E731
    first = _in_child(_open_measure, lambda: open_key_list(kf, opts), n, arrays)
    again = _in_child(_open_measure, lambda: open_key_list(kf, opts), n, arrays)
    index_file = next(cache.glob("*.mcfidx"))

    def dataset_open():
        t0 = time.perf_counter()
        _open_paper(db, kf, cache)
        return time.perf_counter() - t0

    row: dict[str, Any] = {
        "samples": n,
        "key_file_bytes": kf.stat().st_size,
        "first_open": first,
        "reopen": again,
        "dataset_reopen_s": _in_child(dataset_open),
        "index_bytes_per_sample": index_file.stat().st_size / n,
    }
    # A DataLoader worker's epoch: forked from a process holding the data set, it reads every key.
    ds = _open_paper(db, kf, cache)
    row["worker_compact"] = _in_child(_worker_epoch, lambda i: ds.keys.get(i), worker_keys)
    with open(kf, encoding="utf-8") as f:  # the previous representation, for comparison
        baseline = [line.strip() for _, line in zip(range(worker_keys), f)]
    row["worker_list_of_str"] = _in_child(_worker_epoch, lambda i: baseline[i].encode("utf-8"), worker_keys)
    row["worker_keys"] = worker_keys
    return row


def make_empty_folder(root: Path, n: int) -> None:
    """``n`` empty ``.jpg`` files, 1,000 a directory, all mtimes an hour old (trusted by the index)."""
    shutil.rmtree(root, ignore_errors=True)
    for d in range(0, n, FILES_PER_DIR):
        sub = root / f"d{d // FILES_PER_DIR:05d}"
        sub.mkdir(parents=True)
        for i in range(d, min(n, d + FILES_PER_DIR)):
            (sub / f"img_{i:08d}.jpg").touch()
    old = time.time() - 3600  # older than the index's "too recent to trust" window
    for p in [root, *root.iterdir()]:
        os.utime(p, (old, old))
    (root.parent / (root.name + ".complete")).touch()


def folder_bench(work: Path, n: int) -> dict[str, Any]:
    from mcf.data.core.index import IndexOptions
    from mcf.data.formats.scan import open_folder_index

    root, cache = work / f"folder{n}", work / "cache-folder"
    if not (work / f"folder{n}.complete").exists():
        make_empty_folder(root, n)
    shutil.rmtree(cache, ignore_errors=True)
    opts = IndexOptions(cache_dir=str(cache))
    arrays = lambda fi: (fi.files.offsets, fi.files.blob, fi.file_dir, fi.dirs.offsets, fi.dirs.blob)  # noqa: E731
    first = _in_child(_open_measure, lambda: open_folder_index(root, opts), n, arrays)
    again = _in_child(_open_measure, lambda: open_folder_index(root, opts), n, arrays)
    index_file = next(cache.glob("*.mcfidx"))
    return {
        "files": n,
        "directories": -(-n // FILES_PER_DIR),
        "first_open": first,
        "reopen": again,
        "index_bytes_per_sample": index_file.stat().st_size / n,
    }


def shards_bench(work: Path, n: int) -> dict[str, Any]:
    """A shard index of ``n`` samples (fake 10,000-sample shards of 1 GiB): open, bytes per sample, and
    the sampler's cost for one batch deep into an epoch (it never builds an N-long array)."""
    from mcf.data.core.index import IndexFile, PackedStrings, write_index
    from mcf.data.formats.shards import FORMAT, VERSION, ShardSampler, ShardTable

    path = work / f"shards{n}.mcfidx"
    s = -(-n // SHARD_SAMPLES)
    if not path.exists():
        counts = np.full(s, SHARD_SAMPLES, dtype=np.int64)
        counts[-1] = n - SHARD_SAMPLES * (s - 1)
        start = np.concatenate([[0], np.cumsum(counts)])
        member = np.arange(n, dtype=np.int64) - np.repeat(start[:-1], counts)
        arrays = {
            **PackedStrings.from_bytes(b"/data/laion_face/%05d.tar" % k for k in range(s)).arrays("urls"),
            **PackedStrings.from_bytes(b"" for _ in range(s)).arrays("damage"),
            "count": counts,
            "start": start,
            "bad": np.zeros(s, np.int64),
            "size": np.full(s, 2**30, np.int64),
            "mtime": np.zeros(s, np.int64),
            "offset": (member * 100_352 + 512).astype(np.uint32),
            "length": np.full(n, 99_000, np.uint32),
        }
        write_index(
            path,
            {"format": FORMAT, "version": VERSION, "count": n, "shards": s, "remote": False, "source": None},
            arrays,
        )

    def open_and_sample():
        t = ShardTable(IndexFile.open(path))
        sampler = ShardSampler(np.asarray(t.count), rank=3, world_size=8, seed=0, window=2048)
        t0 = time.perf_counter()
        batch = sampler.take(5, 0, sampler.per_rank // 2, sampler.per_rank // 2 + 256)
        return t, (time.perf_counter() - t0, len(batch))

    row = _in_child(_open_measure, open_and_sample, n, lambda r: (r[0].offset, r[0].length))
    sample_s = _in_child(lambda: open_and_sample()[1])
    return {
        "samples": n,
        "shards": s,
        "open": row,
        "index_bytes_per_sample": path.stat().st_size / n,
        "sampler_batch_of_256_s": sample_s[0],
    }


def run(cfg: IndexScaleConfig) -> dict[str, Any]:
    import torch

    from mcf.bench.common import run_info

    tmp = None if cfg.workdir else tempfile.TemporaryDirectory(prefix="mcf-bench-index-")
    work = Path(cfg.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    _preload()
    try:
        result: dict[str, Any] = {"benchmark": "data_index_scale", "keys": keys_bench(work, cfg.keys, cfg.worker_keys)}
        if cfg.folder_files:
            result["folder"] = folder_bench(work, cfg.folder_files)
        result["shards"] = shards_bench(work, cfg.keys)
    finally:
        if tmp is not None:
            tmp.cleanup()
    result["config"] = {k: v for k, v in asdict(cfg).items() if k != "out"}
    result.update(run_info(torch.device("cpu")))
    return result


def main(cfg: IndexScaleConfig) -> dict[str, Any]:
    from mcf.bench.common import emit

    result = run(cfg)
    emit(result, cfg.out)
    return result
