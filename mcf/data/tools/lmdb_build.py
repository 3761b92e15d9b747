"""``mcf data build-lmdb / verify / info``: the folder -> LMDB converter and its checks.

The build writes into ``OUT.partial`` and commits in chunks; each chunk's images and the progress
record (files done, images written, bad files, options) go in one LMDB transaction, so an
interrupted build resumes after its last committed chunk. At the end the ``length`` key and then
``manifest.json`` are written and ``OUT.partial`` is renamed to ``OUT``: a database without the
manifest never opens as complete (see :class:`mcf.data.formats.datasets.LMDBDataset`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

from PIL import Image

from mcf.data.core.decode import DEFAULT_MAX_PIXELS, BadImage, decode_rgb, max_file_bytes, read_file
from mcf.data.core.procs import shutdown, worker_pool
from mcf.data.core.source import READ_ERRORS
from mcf.data.formats.datasets import (
    FORMAT,
    FORMAT_VERSION,
    LENGTH_KEY,
    MANIFEST,
    LMDBDataset,
    image_key,
    name_key,
    scan_image_folder,
)
from mcf.data.formats.factory import open_dataset
from mcf.data.formats.shards import MANIFEST_FORMAT as SHARDS_FORMAT
from mcf.errors import DataError

PROGRESS_KEY = b"__progress__"
BAD_REPORT = "bad_files.txt"
MAP_SIZE = 1 << 40  # sparse on Linux; the file grows with the data


def encode_image(data: bytes, *, resize_short: int | None, quality: int | None, max_pixels: int) -> bytes:
    """Validate ``data`` by decoding it; return it unchanged, or re-encoded as JPEG when a resize
    or a quality is asked (the short side is only ever shrunk). Raises :class:`BadImage`."""
    img = decode_rgb(data, max_pixels)
    if resize_short is None and quality is None:
        return data
    w, h = img.size
    if resize_short is not None and min(w, h) > resize_short:
        scale = resize_short / min(w, h)
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality or 95)
    return buf.getvalue()


MANIFEST_FORMATS = (FORMAT, SHARDS_FORMAT)  # a folder whose manifest.json names one of these was made by mcf


def made_by_mcf(folder: Path) -> bool:
    """Whether ``folder`` is the output of an mcf build (its ``manifest.json`` names an mcf format)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") in MANIFEST_FORMATS


def _relation(a: Path, b: Path) -> str | None:
    """How folder ``a`` sits relative to ``b`` (both resolved): 'is', 'is inside', 'contains' or None."""
    if a == b:
        return "is"
    if b in a.parents:
        return "is inside"
    if a in b.parents:
        return "contains"
    return None


def prepare_output(out: Path, *, sources: list[str | os.PathLike] = (), quality: int | None,
                   resize_short: int | None, overwrite: bool) -> None:
    """Check a build's options and output, then clear ``out`` (only with ``overwrite``); raises DataError.

    Everything is checked before anything is deleted: ``out`` must not be a symbolic link, must not
    be, hold or lie inside any of ``sources`` (the data read: a folder, an LMDB, a list, the shard
    files), and is deleted only when it is an mcf build's output (:func:`made_by_mcf`).
    """
    if quality is not None and not 1 <= quality <= 100:
        raise DataError("--quality must be in 1..100")
    if resize_short is not None and resize_short < 1:
        raise DataError("--resize-short must be positive")
    if out.is_symlink():
        raise DataError(f"{out} is a symbolic link: give the folder itself (a build never writes through or "
                        "replaces a link)")
    real_out = Path(os.path.abspath(out)).resolve()
    for src in sources:
        real_src = Path(os.path.abspath(src)).resolve()
        how = _relation(real_out, real_src)
        if how is not None:
            raise DataError(f"the output {out} {how} the source {src}: choose an OUT outside the data")
    if out.exists():
        if not overwrite:
            raise DataError(f"{out} already exists (pass --overwrite to replace it)")
        if not out.is_dir() or not made_by_mcf(out):
            raise DataError(f"{out} is not the output of an mcf build (no mcf manifest.json): --overwrite deletes "
                            "only what mcf made; remove it yourself or choose another OUT")
        shutil.rmtree(out)


def _encode_file(args: tuple[str, str, int | None, int | None, int]) -> tuple[str, bytes | None, str]:
    root, rel, resize_short, quality, max_pixels = args
    try:
        data = read_file(Path(root) / rel, max_file_bytes(max_pixels))
        return rel, encode_image(data, resize_short=resize_short, quality=quality, max_pixels=max_pixels), ""
    except BadImage as e:
        return rel, None, str(e)


def _open_env(path: Path):
    import lmdb

    # mode: py-lmdb defaults to 0o755 (execute bits on data files); 0o666 lets the umask decide, like open()
    return lmdb.open(str(path), map_size=MAP_SIZE, subdir=True, readahead=False, meminit=False, mode=0o666)


def build_lmdb(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    workers: int = 2,
    resize_short: int | None = None,
    quality: int | None = None,
    chunk_size: int = 512,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
    overwrite: bool = False,
    provenance: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Convert the image folder ``src`` into our LMDB format at ``out``; resumable and atomic.

    Args:
        src: image folder (recursive).
        out: output directory (must not exist unless ``overwrite``); ``out.partial`` while building.
        workers: decoding/encoding processes (0 or 1 = in this process).
        resize_short: shrink the short side to this many pixels (re-encodes as JPEG).
        quality: JPEG re-encode quality (re-encodes every image); None keeps the original bytes.
        chunk_size: files per committed transaction (the resume granularity).

    Returns:
        The manifest written (``count``, ``bad`` = ``[[file, reason], ...]``, ...).

    Raises:
        DataError: missing or empty ``src``, ``out`` exists, a partial build with other options.
    """
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise DataError(f"source folder not found: {src}")
    prepare_output(out, sources=[src], quality=quality, resize_short=resize_short, overwrite=overwrite)
    files = scan_image_folder(src)
    if not files:
        raise DataError(f"no images under {src}")
    options = {"resize_short": resize_short, "quality": quality, "max_pixels": max_pixels, "source": str(src.resolve())}
    files_hash = hashlib.sha256("\n".join(files).encode()).hexdigest()
    partial = out.with_name(out.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    env = _open_env(partial)
    try:
        with env.begin() as txn:
            raw = txn.get(PROGRESS_KEY)
        state = json.loads(raw) if raw else {"done": 0, "count": 0, "bad": [], "options": options, "files": files_hash}
        if state["options"] != options or state["files"] != files_hash:
            raise DataError(
                f"{partial} is an interrupted build with other options or source files; delete it to start over"
            )
        _run_chunks(env, src, files, state, workers, chunk_size, progress)
        count = state["count"]
        if count == 0:
            raise DataError(f"none of the {len(files)} files under {src} could be decoded (see {partial / BAD_REPORT})")
        with env.begin(write=True) as txn:
            txn.put(LENGTH_KEY, str(count).encode())
            txn.delete(PROGRESS_KEY)
        env.sync(True)
    finally:
        env.close()
        if "state" in locals():
            _write_bad_report(partial, state["bad"])
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "count": count,
        "build": options,
        "bad": state["bad"],
        "provenance": provenance or [{"source": str(src.resolve())}],
    }
    tmp = partial / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, partial / MANIFEST)
    os.replace(partial, out)
    return manifest


def _run_chunks(env, src: Path, files: list[str], state: dict, workers: int, chunk_size: int, progress: bool) -> None:
    from tqdm import tqdm

    opts = state["options"]
    jobs = [(str(src), rel, opts["resize_short"], opts["quality"], opts["max_pixels"]) for rel in files]
    pool = worker_pool(workers) if workers > 1 else None  # its workers die with this process, even on SIGKILL
    bar = tqdm(total=len(files), initial=state["done"], unit="img", disable=not progress, desc="build-lmdb")
    done = False
    try:
        for start in range(state["done"], len(files), chunk_size):
            chunk = jobs[start : start + chunk_size]
            results = pool.map(_encode_file, chunk, chunksize=8) if pool else map(_encode_file, chunk)
            _commit_chunk(env, state, list(results), start + len(chunk))
            bar.update(len(chunk))
        done = True
    finally:
        bar.close()
        if pool:
            shutdown(pool, kill=not done)  # after an error or ^C: cancel and kill, never wait on queued work


def _commit_chunk(env, state: dict, results: list[tuple[str, bytes | None, str]], done: int) -> None:
    """Write one chunk's images and the progress record in a single transaction."""
    count, bad = state["count"], list(state["bad"])
    with env.begin(write=True) as txn:
        for rel, data, reason in results:
            if data is None:
                bad.append([rel, reason])
                continue
            txn.put(image_key(count), data)
            txn.put(name_key(count), rel.encode())
            count += 1
        new = dict(state, done=done, count=count, bad=bad)
        txn.put(PROGRESS_KEY, json.dumps(new).encode())
    state.update(new)


def _write_bad_report(path: Path, bad: list[list[str]]) -> None:
    (path / BAD_REPORT).write_text("".join(f"{rel}\t{reason}\n" for rel, reason in bad))


def verify_dataset(
    path: str | os.PathLike, lmdb_keys: str | None = None, *, progress: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> dict[str, Any]:
    """Decode every sample of a data set: ``{"count": n, "bad": [[name, reason], ...]}``."""
    from tqdm import tqdm

    ds = open_dataset(path, lmdb_keys, max_pixels=max_pixels)
    bad = []
    for i in tqdm(range(len(ds)), unit="img", disable=not progress, desc="verify"):
        try:
            decode_rgb(ds.read_bytes(i), max_pixels)
        except READ_ERRORS as e:
            bad.append([ds.name(i), str(e) or type(e).__name__])
    return {"count": len(ds), "bad": bad}


def dataset_info(path: str | os.PathLike, lmdb_keys: str | None = None, *, sample: int = 16) -> dict[str, Any]:
    """Kind, count, bytes on disk, splits, provenance and the sizes of the first ``sample`` images."""
    ds = open_dataset(path, lmdb_keys)
    p = Path(ds.path if hasattr(ds, "path") else ds.root)
    disk = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
    sizes = []
    for i in range(min(sample, len(ds))):
        try:
            sizes.append(list(decode_rgb(ds.read_bytes(i), ds.max_pixels).size))
        except READ_ERRORS:
            sizes.append(None)
    info: dict[str, Any] = {
        "path": str(p), "kind": type(ds).__name__, "count": len(ds), "disk_bytes": disk, "sizes": sizes,
    }
    if isinstance(ds, LMDBDataset):
        info["splits"] = ds.manifest.get("splits") or {}
        info["provenance"] = ds.provenance
        info["bad_at_build"] = len(ds.manifest.get("bad") or [])
    return info
