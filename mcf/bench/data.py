"""``mcf bench data``: images/s of mcf's DALI loader vs its PyTorch loader on the same files, and
(``--index-scale N``) what opening a data set of N samples costs.

Loader mode: same images as an image folder, the LMDB built from it by ``mcf.data.build_lmdb`` and
the webdataset shards built by ``mcf.data.tools.shards_build.build_shards``; same workers, batch, size and
transform (mcf's resize + flip). The release's PIL DataLoader is timed on the folder too, as the
baseline the step benchmark's ``paper`` variant uses. DALI decodes on the CPU here and ``mixed``
(nvJPEG) on a GPU. The first batch (worker start-up, pipeline build) is not timed.

Index-scale mode (:func:`run_index_scale`) measures the indexes of :mod:`mcf.data.core.index` on synthetic
data that is cheap to make: a key file of N 13-character keys plus a tiny LMDB (the paper's layout:
its ``length`` says N, it holds the first and last keys), a folder of empty ``.jpg`` files, and a
shard index of N samples over fake shards. For each: first open (scan + write), re-open, the index's
bytes per sample, and resident memory per sample after touching every entry; and the private
(copy-on-write) memory a forked worker gains reading every key, against a ``list[str]`` baseline.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from mcf.bench.common import emit, run_info
from mcf.bench.config import DataBenchConfig
from mcf.measure import device_name, resolve_device, sync

log = logging.getLogger(__name__)


def _time_loader(batches, n_batches: int, batch_size: int, device: torch.device) -> dict[str, Any]:
    t0 = time.perf_counter()
    first = next(batches)  # worker start-up / pipeline build: not timed
    sync(device)
    t1 = time.perf_counter()
    shape = tuple(first.shape)
    for _ in range(n_batches):
        b = next(batches)
    sync(device)
    dt = time.perf_counter() - t1
    assert b.shape == first.shape
    return {
        "images_per_s": n_batches * batch_size / dt, "seconds": dt, "first_batch_s": t1 - t0, "batch_shape": list(shape)
    }


def run(cfg: DataBenchConfig) -> dict[str, Any]:
    from mcf.bench import feeds
    from mcf.data import dali_available

    device = resolve_device(cfg.device)
    tmp = tempfile.TemporaryDirectory(prefix="mcf-bench-data-")
    try:
        folder = Path(cfg.data) if cfg.data else feeds.make_jpeg_folder(tmp.name, cfg.count, cfg.file_size)
        paths: dict[str, Path] = {"folder": folder}
        if "lmdb" in cfg.sources:
            from mcf.data import build_lmdb

            paths["lmdb"] = Path(tmp.name) / "lmdb"
            build_lmdb(folder, paths["lmdb"], workers=1, progress=False)
        if "shards" in cfg.sources:
            from mcf.data.tools.shards_build import build_shards

            paths["shards"] = Path(tmp.name) / "shards"
            build_shards(folder, paths["shards"], max_count=max(1, cfg.count // 4), workers=1, progress=False)
        dali_ok = bool(dali_available(device))
        rows: list[dict[str, Any]] = []
        for source in cfg.sources:
            for kind in ("torch", "dali"):
                row: dict[str, Any] = {"source": source, "loader": kind, "workers": cfg.workers}
                if kind == "dali" and not dali_ok:
                    row["skipped"] = "DALI is not installed or cannot run on this device"
                    rows.append(row)
                    continue
                log.info("bench data: %s loader on %s", kind, source)
                try:
                    ld, got = feeds.mcf_loader(paths[source], cfg.img_size, cfg.batch_size, cfg.workers, device, kind)
                    row["decoder"] = ("mixed" if device.type == "cuda" else "cpu") if got == "dali" else "pil"
                    row.update(_time_loader(feeds.mcf_batches(ld), cfg.batches, cfg.batch_size, device))
                    if hasattr(ld, "close"):
                        ld.close()
                    del ld
                except Exception as e:  # a loader that fails here is reported, not hidden, and the others still run
                    log.error("bench data: %s loader on %s failed: %s", kind, source, e)
                    row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
                rows.append(row)
        if "folder" in cfg.sources:
            log.info("bench data: the release's PIL DataLoader on folder")
            n = (cfg.batches + 2) * cfg.batch_size
            pl = feeds.paper_loader(folder, cfg.img_size, cfg.batch_size, cfg.workers, device, length=n)
            row = {"source": "folder", "loader": "paper-pil", "workers": cfg.workers, "decoder": "pil"}
            row.update(_time_loader(feeds.paper_batches(pl, device), cfg.batches, cfg.batch_size, device))
            rows.append(row)
        file_count = sum(1 for p in folder.rglob("*") if p.is_file() and ".mcf" not in p.parts)
    finally:
        tmp.cleanup()

    def ips(source: str, loader: str) -> float | None:
        for r in rows:
            if r["source"] == source and r["loader"] == loader and "images_per_s" in r:
                return r["images_per_s"]
        return None

    ratios = {}
    for source in cfg.sources:
        d, t = ips(source, "dali"), ips(source, "torch")
        ratios[f"{source}_dali_over_torch"] = d / t if d and t else None
    return {
        "benchmark": "data",
        "results": rows,
        "ratio": ratios,
        "dali_available": dali_ok,
        "device": device_name(device),
        "files": file_count,
        "data": str(cfg.data) if cfg.data else f"synthetic JPEGs ({cfg.file_size}², q90)",
        "config": {k: v for k, v in asdict(cfg).items() if k != "out"},
        **run_info(device),
    }


def main(cfg: DataBenchConfig) -> dict[str, Any]:
    result = run(cfg)
    emit(result, cfg.out)
    return result
