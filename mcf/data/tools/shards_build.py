"""``mcf data build-shards / index`` and the shard side of ``verify`` / ``info``.

``build-shards SRC OUT`` writes any openable data set (image folder, mcf LMDB, the paper's LMDB,
shards) as webdataset shards ``OUT/00000.tar, 00001.tar, ...`` of at most ``max_count`` samples
and/or ``max_bytes`` bytes. Each sample is ``<key>.<ext>`` (the image: its original bytes, or a
JPEG when resizing or a quality is asked; formats other than JPEG, PNG and WebP are re-encoded as
lossless PNG, the extensions the shard reader takes) plus ``<key>.json`` (``{"source": name}``);
keys are the output sample numbers, ``%09d``. Every image is decoded first, as ``build-lmdb``
does: bad files are left out and listed in ``bad_files.txt``.

The build runs in ``OUT.partial``: a shard is written as ``NNNNN.tar.tmp``, renamed when complete,
and then ``progress.json`` (source samples done, shards, bad files, options, a fingerprint of the
source) is replaced atomically, so an interrupted build resumes after its last complete shard. At
the end ``manifest.json`` is written (last: its presence marks a complete set), the folder renamed
to ``OUT``, and the shard index written into ``OUT/.mcf`` from the offsets recorded while writing.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mcf.data.core.decode import DEFAULT_MAX_PIXELS, BadImage, decode_rgb, max_file_bytes
from mcf.data.core.index import IndexOptions, PackedStrings, index_location, write_index
from mcf.data.core.procs import shutdown, worker_pool
from mcf.data.core.tar_index import TarDamage, stream_samples
from mcf.data.formats.factory import open_dataset
from mcf.data.formats.shards import FORMAT as INDEX_FORMAT
from mcf.data.formats.shards import (
    MANIFEST_FORMAT,
    ShardDataset,
    StreamedShards,
    open_shards,
    open_stream,
    resolve_shards,
)
from mcf.data.formats.shards import VERSION as INDEX_VERSION
from mcf.data.tools.lmdb_build import encode_image, prepare_output
from mcf.errors import DataError
from mcf.fileio import write_text_atomic

MANIFEST = "manifest.json"
PROGRESS = "progress.json"
BAD_REPORT = "bad_files.txt"
VERSION = 1
CHUNK = 256  # source samples per batch of work handed to the pool
_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}

_JOB: tuple | None = None  # (dataset, resize_short, quality, max_pixels): inherited by the forked workers


def _encode(i: int) -> tuple[int, str, bytes | None, str]:
    """``(i, name, bytes or None, extension or the reason it is bad)`` of source sample ``i``."""
    ds, resize_short, quality, max_pixels = _JOB
    name = ds.name(i)
    try:
        data = ds.read_bytes(i)
        out = encode_image(data, resize_short=resize_short, quality=quality, max_pixels=max_pixels)
    except BadImage as e:
        return i, name, None, str(e)
    except OSError as e:
        return i, name, None, f"unreadable ({e.strerror or e})"
    if out is not data:
        return i, name, out, "jpg"
    with Image.open(io.BytesIO(out)) as img:
        ext = _EXT.get(img.format or "")
    if ext is None:  # BMP, TIFF, PPM, ...: not an image member a shard reader takes
        buf = io.BytesIO()
        decode_rgb(out, max_pixels).save(buf, format="PNG")
        out, ext = buf.getvalue(), "png"
    return i, name, out, ext


def _fingerprint(ds: Any) -> str:
    """Identifies the source's sample list (resuming against another source is refused)."""
    h = hashlib.sha256(f"{type(ds).__name__}:{len(ds)}".encode())
    index = getattr(ds, "index", None)
    if index is not None and hasattr(index, "files"):  # an image folder: its whole file list
        for a in (index.files.offsets, index.files.blob, index.file_dir, index.dirs.offsets, index.dirs.blob):
            h.update(np.ascontiguousarray(a).tobytes())
    else:
        for i in [*range(min(16, len(ds))), *range(max(16, len(ds) - 16), len(ds))]:
            h.update(ds.name(i).encode("utf-8", "replace"))
    return h.hexdigest()


def _read_progress(path: Path) -> dict[str, Any]:
    """An interrupted build's ``progress.json``; a damaged one is a DataError naming it."""
    try:
        state = json.loads(path.read_text())
        keys = {"done": int, "count": int, "shards": list, "bad": list, "options": dict}
        if (
            isinstance(state, dict)
            and all(isinstance(state.get(k), t) for k, t in keys.items())
            and all(
                isinstance(s, dict) and isinstance(s.get("name"), str) and "/" not in s["name"] for s in state["shards"]
            )
        ):
            return state
    except (OSError, ValueError):
        pass
    raise DataError(f"{path} is damaged (not the progress record of a build): delete {path.parent} to start over")


def _atomic_json(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1))


class _ShardWriter:
    """Appends samples to ``NNNNN.tar.tmp`` (USTAR headers written here, so the byte count is exact:
    ``tarfile`` would pad the archive to 10 KiB records) and records each image's (offset, size)."""

    END = 2 * 512  # two zero blocks close an archive

    def __init__(self, folder: Path, number: int):
        self.name = f"{number:05d}.tar"
        self.tmp = folder / (self.name + ".tmp")
        self.final = folder / self.name
        self.f = open(self.tmp, "wb")
        self.count, self.bytes = 0, 0
        self.images: list[tuple[int, int]] = []

    @staticmethod
    def size_of(members: list[bytes]) -> int:
        return sum(512 + (len(m) + 511) // 512 * 512 for m in members)

    def add(self, key: str, ext: str, image: bytes, meta: bytes) -> None:
        for name, data in ((f"{key}.{ext}", image), (f"{key}.json", meta)):
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), 0o644, 0
            header = ti.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
            if data is image:
                self.images.append((self.bytes + len(header), len(data)))
            self.f.write(header + data + b"\0" * (-len(data) % 512))
            self.bytes += len(header) + len(data) + (-len(data) % 512)
        self.count += 1

    def close(self) -> dict[str, Any]:
        self.f.write(b"\0" * self.END)
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.final)
        return {"name": self.name, "count": self.count, "bytes": self.final.stat().st_size, "images": self.images}


def build_shards(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    lmdb_keys: str | os.PathLike | None = None,
    max_count: int | None = 10_000,
    max_bytes: int | None = None,
    workers: int = 2,
    resize_short: int | None = None,
    quality: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write ``src`` as webdataset shards in ``out`` (see the module docstring); resumable and atomic.

    Args:
        src: image folder, mcf LMDB, the paper's LMDB (with ``lmdb_keys``) or shards.
        max_count, max_bytes: a shard closes at this many samples / before this many bytes
            (at least one of them; a single sample larger than ``max_bytes`` gets a shard of its own).
        workers: decoding processes (0 or 1 = in this process).

    Returns:
        The manifest written (``count``, ``shards``, ``bad`` = ``[[name, reason], ...]``, ...).
    """
    from tqdm import tqdm

    global _JOB
    out = Path(out)
    if max_count is None and max_bytes is None:
        raise DataError("give --max-count and/or --max-bytes")
    if (max_count is not None and max_count < 1) or (max_bytes is not None and max_bytes < 2048):
        raise DataError("--max-count must be >= 1 and --max-bytes >= 2048")
    ds = open_dataset(src, lmdb_keys, index=IndexOptions(write=False))  # SRC checked before OUT is touched
    if isinstance(ds, StreamedShards):
        raise DataError("build-shards reads local data (an image folder, an LMDB or local shards)")
    sources = [p for p in (src, lmdb_keys) if p is not None and os.path.exists(p)]
    if isinstance(ds, ShardDataset):
        sources += ds.spec.urls
    prepare_output(out, sources=sources, quality=quality, resize_short=resize_short, overwrite=overwrite)
    options = {
        "max_count": max_count,
        "max_bytes": max_bytes,
        "resize_short": resize_short,
        "quality": quality,
        "max_pixels": max_pixels,
        "source": str(Path(src).absolute()),
        "lmdb_keys": str(lmdb_keys) if lmdb_keys else None,
    }
    partial = out.with_name(out.name + ".partial")
    state_path = partial / PROGRESS
    if partial.is_symlink() or partial.exists() and (not partial.is_dir() or any(partial.iterdir())
                                                      and not state_path.is_file()):
        raise DataError(f"{partial} exists and is not an interrupted build-shards (no {PROGRESS}): move it away")
    fingerprint = _fingerprint(ds)
    state = _read_progress(state_path) if state_path.is_file() else {
        "done": 0, "count": 0, "shards": [], "bad": [], "options": options, "source": fingerprint}
    partial.mkdir(parents=True, exist_ok=True)
    for stray in partial.glob("*.tmp"):
        stray.unlink()
    if state["options"] != options or state["source"] != fingerprint:
        raise DataError(
            f"{partial} is an interrupted build with other options or another source; delete it to start over"
        )
    for s in state["shards"]:
        if not (partial / s["name"]).is_file():
            raise DataError(f"{partial} lacks {s['name']} listed in its {PROGRESS}; delete it to start over")

    _JOB = (ds, resize_short, quality, max_pixels)
    pool = worker_pool(workers) if workers > 1 else None
    bar = tqdm(total=len(ds), initial=state["done"], unit="img", disable=not progress, desc="build-shards")
    writer: _ShardWriter | None = None
    pending_bad: list[list[str]] = []

    def commit(done: int) -> None:
        nonlocal writer, pending_bad
        info = writer.close()
        state.update(
            done=done,
            count=state["count"] + info["count"],
            shards=state["shards"] + [info],
            bad=state["bad"] + pending_bad,
        )
        _atomic_json(state_path, state)
        writer, pending_bad = None, []

    finished = False
    try:
        for start in range(state["done"], len(ds), CHUNK):
            chunk = range(start, min(start + CHUNK, len(ds)))
            results = pool.map(_encode, chunk, chunksize=8) if pool else map(_encode, chunk)
            for i, name, data, ext in results:
                bar.update(1)
                if data is None:
                    pending_bad.append([name, ext])
                    continue
                meta = json.dumps({"source": name}).encode()
                grown = (
                    writer.bytes + _ShardWriter.size_of([data, meta]) + _ShardWriter.END if writer is not None else 0
                )
                if writer is not None and max_bytes is not None and grown > max_bytes:
                    commit(i)
                if writer is None:
                    writer = _ShardWriter(partial, len(state["shards"]))
                writer.add(f"{state['count'] + writer.count:09d}", ext, data, meta)
                if max_count is not None and writer.count >= max_count:
                    commit(i + 1)
        if writer is not None:
            commit(len(ds))
        elif pending_bad:
            state.update(done=len(ds), bad=state["bad"] + pending_bad)
            _atomic_json(state_path, state)
            pending_bad = []
        finished = True
    finally:
        bar.close()
        if pool is not None:
            shutdown(pool, kill=not finished)
        if writer is not None:  # an interrupted shard: dropped, re-made on resume
            writer.f.close()
            writer.tmp.unlink(missing_ok=True)
        _JOB = None
        (partial / BAD_REPORT).write_text("".join(f"{n}\t{r}\n" for n, r in state["bad"] + pending_bad))
    if state["count"] == 0:
        raise DataError(f"none of the {len(ds)} samples of {src} could be decoded (see {partial / BAD_REPORT})")
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": VERSION,
        "count": state["count"],
        "shards": [{k: s[k] for k in ("name", "count", "bytes")} for s in state["shards"]],
        "build": options,
        "bad": state["bad"],
        "provenance": [{"source": options["source"]}],
    }
    _atomic_json(partial / MANIFEST, manifest)
    os.replace(partial, out)
    (out / PROGRESS).unlink()
    _write_built_index(out, state["shards"])
    return manifest


def _write_built_index(out: Path, shards: list[dict[str, Any]]) -> None:
    """The shard index of a finished build, from the offsets recorded while writing (no re-read)."""
    spec = resolve_shards(out)
    urls = [str(out.absolute() / s["name"]) for s in shards]
    if list(spec.urls) != urls:
        return  # something else in the folder: leave the index to the first use
    stats = [os.stat(u) for u in urls]
    counts = np.array([s["count"] for s in shards], dtype=np.int64)
    start = np.concatenate([[0], np.cumsum(counts)])
    big = max(st.st_size for st in stats) >= 2**32
    arrays = {
        **PackedStrings.from_bytes(os.fsencode(u) for u in urls).arrays("urls"),
        **PackedStrings.from_bytes(b"" for _ in urls).arrays("damage"),
        "count": counts,
        "start": start,
        "bad": np.zeros(len(urls), dtype=np.int64),
        "size": np.array([st.st_size for st in stats], dtype=np.int64),
        "mtime": np.array([st.st_mtime_ns for st in stats], dtype=np.int64),
        "offset": np.array([o for s in shards for o, _ in s["images"]], dtype=np.uint64 if big else np.uint32),
        "length": np.array([n for s in shards for _, n in s["images"]], dtype=np.uint32),
    }
    meta = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "count": int(start[-1]),
        "shards": len(urls),
        "remote": False,
        "source": None,
    }
    path = index_location(spec.name, spec.source, spec.data_dir, None)
    path.parent.mkdir(exist_ok=True)
    write_index(path, meta, arrays)


# -- verify / info -----------------------------------------------------------------------------------
def verify_shards(
    spec: str | os.PathLike,
    *,
    progress: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    index: IndexOptions | None = None,
) -> dict[str, Any]:
    """Decode every image sample: ``{"count": n, "bad": [[name, reason], ...]}``; shards that break
    off are listed too (as the shard, with the reason)."""
    from tqdm import tqdm

    ds = open_shards(spec, max_pixels=max_pixels, index=index)
    bad: list[list[str]] = []
    for k in range(len(ds.table)):
        if ds.table.damage(k):
            bad.append([ds.table.url(k), ds.table.damage(k)])
    if isinstance(ds, ShardDataset):
        for i in tqdm(range(len(ds)), unit="img", disable=not progress, desc="verify"):
            try:
                decode_rgb(ds.read_bytes(i), max_pixels)
            except BadImage as e:
                bad.append([ds.name(i), str(e)])
        return {"count": len(ds), "bad": bad}
    bar = tqdm(total=len(ds), unit="img", disable=not progress, desc="verify")
    for k in range(len(ds.table)):
        url, n = ds.table.url(k), 0
        try:
            with open_stream(url) as f:
                for data in stream_samples(f, max_file_bytes(max_pixels)):
                    try:
                        decode_rgb(data, max_pixels)
                    except BadImage as e:
                        bad.append([f"{url}[sample {n}]", str(e)])
                    n += 1
                    bar.update(1)
        except (TarDamage, DataError, OSError) as e:
            bad.append([url, f"broke off after {n} samples: {e}"])
        if n < int(ds.table.count[k]):
            bad.append([url, f"{int(ds.table.count[k]) - n} of its indexed samples missing"])
    bar.close()
    return {"count": len(ds), "bad": bad}


def shards_info(spec: str | os.PathLike, *, sample: int = 16, index: IndexOptions | None = None) -> dict[str, Any]:
    ds = open_shards(spec, index=index)
    t = ds.table
    sizes = []
    if isinstance(ds, ShardDataset):
        for i in range(min(sample, len(ds))):
            try:
                sizes.append(list(decode_rgb(ds.read_bytes(i), ds.max_pixels).size))
            except BadImage:
                sizes.append(None)
    info: dict[str, Any] = {
        "path": str(spec),
        "kind": type(ds).__name__,
        "count": len(ds),
        "shards": len(t),
        "disk_bytes": int(np.asarray(t.size).clip(0).sum()),
        "damaged_shards": [[t.url(k), t.damage(k)] for k in range(len(t)) if t.damage(k)],
        "sizes": sizes,
        "index": str(t.idx.path) if t.idx.path else None,
    }
    manifest = ds.spec.data_dir / MANIFEST if ds.spec.data_dir is not None else None
    if manifest is not None and manifest.is_file():
        m = json.loads(manifest.read_text())
        if m.get("format") == MANIFEST_FORMAT:
            info["provenance"] = m.get("provenance") or []
            info["bad_at_build"] = len(m.get("bad") or [])
    return info
