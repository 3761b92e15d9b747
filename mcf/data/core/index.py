"""Compact, shared indexes: many strings as one byte buffer plus an offsets array, in a memory-mapped file.

A data set's list of keys or file names held as a Python ``list[str]`` costs ~70-90 bytes of private
memory per sample in every rank, and DataLoader workers copy its pages as reference counts change.
Here such a list is a :class:`PackedStrings`: ``blob`` (uint8, the strings back to back) and
``offsets`` (uint32 while the blob is under 4 GiB, else uint64, ``len + 1`` entries), so a
13-character key costs 13 + 4 bytes. Reading an entry never writes to these pages, so forked workers
share them for good; in a file they are page-cache pages shared by every process on the node.

The file (``*.mcfidx``, see :func:`write_index`)::

    b"MCFIDX\\0\\1" | uint64 header length | JSON header | arrays, each 64-byte aligned

The header holds ``meta`` (what the index describes, for the freshness checks of its users) and
``arrays`` (name -> dtype, shape, byte offset). Files are written to a temporary name and renamed,
so a reader sees the old index or the new one, never half of one.

:func:`open_or_build` is the start-up protocol every source uses: rank 0 opens a fresh index or
(re)builds and writes it; the other ranks wait for that file (polling, so it works across nodes on a
shared file system and needs no process group) instead of scanning the data themselves.

Numpy only: DALI's spawned source workers unpickle the datasets that hold these.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mcf.errors import DataError
from mcf.fileio import atomic_path, mcf_cache_dir

log = logging.getLogger(__name__)

MAGIC = b"MCFIDX\x00\x01"
ALIGN = 64
INDEX_DIR = ".mcf"  # next to the data: ``<data dir>/.mcf/<name>.mcfidx``
POLL_S = (0.05, 2.0)  # first and longest sleep of a rank waiting for rank 0's index
RACY_NS = 2_000_000_000  # an mtime this recent may not tick again at the next change (2 s: FAT/NFS granularity)


def offsets_dtype(total_bytes: int) -> np.dtype:
    return np.dtype(np.uint32) if total_bytes < 2**32 else np.dtype(np.uint64)


class PackedStrings:
    """An immutable sequence of byte strings: entry ``i`` is ``blob[offsets[i]:offsets[i + 1]]``.

    Args:
        offsets: ``(n + 1,)`` unsigned integers, non-decreasing, ``offsets[0] == 0``.
        blob: ``(offsets[-1],)`` uint8.
    """

    def __init__(self, offsets: np.ndarray, blob: np.ndarray, source: tuple[IndexFile, str] | None = None):
        self.offsets, self.blob = offsets, blob
        self._source = source  # (index file, prefix) when mapped from one: pickled as that, not as data
        # memoryviews of the same pages: indexing them costs ~0.1 us, a numpy scalar ~1 us
        self._o, self._b = memoryview(np.ascontiguousarray(offsets)), memoryview(np.ascontiguousarray(blob))

    @classmethod
    def from_bytes(cls, items: Iterable[bytes]) -> PackedStrings:
        items = list(items)
        lengths = np.fromiter((len(b) for b in items), dtype=np.int64, count=len(items))
        total = int(lengths.sum())
        offsets = np.zeros(len(items) + 1, dtype=offsets_dtype(total))
        np.cumsum(lengths, out=offsets[1:], dtype=offsets.dtype)
        return cls(offsets, np.frombuffer(b"".join(items), dtype=np.uint8))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def get(self, i: int) -> bytes:
        return self._b[self._o[i] : self._o[i + 1]].tobytes()

    def __getitem__(self, i: int) -> str:
        return os.fsdecode(self.get(i))

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}.offsets": self.offsets, f"{prefix}.blob": self.blob}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str) -> PackedStrings:
        return cls(arrays[f"{prefix}.offsets"], arrays[f"{prefix}.blob"])

    @classmethod
    def from_index(cls, idx: IndexFile, prefix: str) -> PackedStrings:
        return cls(idx.arrays[f"{prefix}.offsets"], idx.arrays[f"{prefix}.blob"], (idx, prefix))

    def __getstate__(self) -> dict[str, Any]:
        if self._source is not None and self._source[0].path is not None:
            return {"_source": self._source}
        return {"offsets": np.asarray(self.offsets), "blob": np.asarray(self.blob), "_source": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        if state["_source"] is not None:
            idx, prefix = state["_source"]
            self.__init__(idx.arrays[f"{prefix}.offsets"], idx.arrays[f"{prefix}.blob"], state["_source"])
        else:
            self.__init__(state["offsets"], state["blob"])

    @property
    def nbytes(self) -> int:
        return int(self.offsets.nbytes + self.blob.nbytes)


# ASCII whitespace that ``str.strip()`` removes (a key list written on Windows ends its lines in \r).
_WS = np.zeros(256, dtype=bool)
_WS[[9, 10, 11, 12, 13, 28, 29, 30, 31, 32]] = True


def pack_lines(data: bytes) -> PackedStrings:
    """The non-blank lines of a text, stripped of ASCII whitespace, in order.

    Vectorised: a 20M-line key file takes a second or two (unloaded host) and ~40 bytes per line at
    the peak; a file whose only whitespace is one newline per line takes the fast path.
    """
    n = len(data)
    raw = np.frombuffer(data, dtype=np.uint8)
    nl = np.flatnonzero(raw == 10)
    only_newlines = np.count_nonzero(raw < 33) == len(nl)  # every whitespace byte is below 33
    if only_newlines and (len(nl) == 0 or (nl[0] > 0 and (len(nl) < 2 or np.diff(nl).min() > 1))):
        # the usual file: newlines are its only whitespace and no line is blank
        count = len(nl) + (1 if n and data[-1] != 10 else 0)
        offsets = np.zeros(count + 1, dtype=offsets_dtype(n))
        offsets[1 : len(nl) + 1] = nl - np.arange(len(nl))  # line k ends at nl[k] - k in the blob
        offsets[-1] = n - len(nl)
        return PackedStrings(offsets, np.frombuffer(data.replace(b"\n", b""), dtype=np.uint8))
    starts = np.empty(len(nl) + 1, dtype=np.int64)
    starts[0], starts[1:] = 0, nl + 1
    ends = np.empty(len(nl) + 1, dtype=np.int64)
    ends[:-1], ends[-1] = nl, n
    del nl
    while True:  # strip trailing, then leading whitespace (one pass per whitespace character)
        m = ends > starts
        m[m] = _WS[raw[ends[m] - 1]]
        if not m.any():
            break
        ends[m] -= 1
    while True:
        m = ends > starts
        m[m] = _WS[raw[starts[m]]]
        if not m.any():
            break
        starts[m] += 1
    keep = ends > starts
    starts, ends = starts[keep], ends[keep]
    lengths = ends - starts
    total = int(lengths.sum())
    # +1 where a kept line starts, -1 where it ends (all distinct positions: a line ends before the
    # next one's newline), so the running sum is 1 exactly inside kept lines
    mark = np.zeros(n + 1, dtype=np.int8)
    mark[starts], mark[ends] = 1, -1
    inside = np.cumsum(mark[:-1], dtype=np.int8).view(bool)
    del mark
    blob = raw[inside]
    offsets = np.zeros(len(lengths) + 1, dtype=offsets_dtype(total))
    np.cumsum(lengths, out=offsets[1:], dtype=offsets.dtype)
    return PackedStrings(offsets, np.ascontiguousarray(blob))


# -- the file ----------------------------------------------------------------------------------------
def _align(x: int) -> int:
    return (x + ALIGN - 1) // ALIGN * ALIGN


def write_index(path: Path, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """Write an index file atomically (:func:`mcf.fileio.atomic_path`: temporary file, fsync, rename)."""
    layout = {name: np.ascontiguousarray(a) for name, a in arrays.items()}
    rel, pos = {}, 0
    for name, a in layout.items():
        rel[name], pos = pos, _align(pos + a.nbytes)
    # the header holds the absolute offsets, which depend on its own length: reserve room for their digits
    draft = json.dumps({"meta": meta, "arrays": {k: [a.dtype.str, list(a.shape), rel[k]] for k, a in layout.items()}})
    base = _align(16 + len(draft.encode()) + 24 * len(layout))
    specs = {k: [a.dtype.str, list(a.shape), base + rel[k]] for k, a in layout.items()}
    body = json.dumps({"meta": meta, "arrays": specs}).encode()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(MAGIC + np.uint64(len(body)).tobytes() + body)
        for name, a in layout.items():
            f.seek(specs[name][2])
            f.write(memoryview(a).cast("B") if a.nbytes else b"")
        f.truncate(base + pos)


def _stamp(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _array_spec(spec: Any) -> tuple[np.dtype, tuple[int, ...], int]:
    """``(dtype, shape, byte offset)`` of one header entry ``[dtype.str, shape, offset]``; ``ValueError``
    for anything else (a tampered header: an object dtype, a negative or non-integer size)."""
    if not (isinstance(spec, list) and len(spec) == 3 and isinstance(spec[0], str) and isinstance(spec[1], list)):
        raise ValueError(f"bad array entry {str(spec)[:80]}")
    dtype, shape, off = spec
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise ValueError(f"bad dtype {dtype[:40]!r}") from None
    if dt.kind not in "biu" or len(shape) > 2 or not all(type(d) is int and 0 <= d < 2**48 for d in (*shape, off)):
        raise ValueError(f"bad array entry {str(spec)[:80]}")
    return dt, tuple(shape), off


class IndexFile:
    """An opened index: ``meta`` (dict) and ``arrays`` (name -> read-only array).

    File-backed arrays are memory maps; pickling carries only the path (and the file's identity),
    so a spawned worker maps the same file instead of receiving a copy. In-memory indexes (data
    that could not be cached) pickle their arrays.
    """

    def __init__(self, meta: dict[str, Any], arrays: dict[str, np.ndarray], path: Path | None = None):
        self.meta, self.arrays, self.path = meta, arrays, path
        self._stamp = _stamp(path) if path is not None else None

    @classmethod
    def open(cls, path: str | os.PathLike) -> IndexFile:
        """Map ``path``; raises ``ValueError`` for a file that is not a complete index."""
        path = Path(path)
        size = path.stat().st_size
        if size < 16:
            raise ValueError("too short")
        mm = np.memmap(path, dtype=np.uint8, mode="r")
        if mm[:8].tobytes() != MAGIC:
            raise ValueError("not an mcf index")
        hlen = int(mm[8:16].view(np.uint64)[0])
        if 16 + hlen > size:
            raise ValueError("truncated header")
        header = json.loads(mm[16 : 16 + hlen].tobytes())
        if not (
            isinstance(header, dict) and isinstance(header.get("meta"), dict) and isinstance(header.get("arrays"), dict)
        ):
            raise ValueError("header is not {meta, arrays}")
        arrays = {}
        for name, spec in header["arrays"].items():
            dt, shape, off = _array_spec(spec)
            nbytes = dt.itemsize * int(np.prod(shape, dtype=np.int64))
            if off < 16 + hlen or off + nbytes > size:
                raise ValueError(f"truncated array {name}")
            arrays[name] = np.asarray(mm[off : off + nbytes]).view(dt).reshape(shape) if nbytes else np.zeros(shape, dt)
        return cls(header["meta"], arrays, path)

    def __getstate__(self) -> dict[str, Any]:
        if self.path is None:
            return {
                "meta": self.meta,
                "arrays": {k: np.asarray(v) for k, v in self.arrays.items()},
                "path": None,
                "_stamp": None,
            }
        return {"path": self.path, "_stamp": self._stamp}

    def __setstate__(self, state: dict[str, Any]) -> None:
        if state["path"] is None:
            self.__dict__.update(state)
            return
        other = IndexFile.open(state["path"])
        if other._stamp != state["_stamp"]:
            raise DataError(f"the index {state['path']} was rebuilt while this run was using it; restart the run")
        self.__dict__.update(other.__dict__)


# -- where indexes live, and who builds them ----------------------------------------------------------
@dataclass(frozen=True)
class IndexOptions:
    """How a source's index is found or made (``data.index_cache``, ``data.index_wait_s``).

    Attributes:
        cache_dir: folder for index files (read-only data); None = next to the data.
        write: False = build in memory and write nothing (tools that must not touch the data).
        rank: global rank: rank 0 builds, the others wait for its file.
        world_size: the number of ranks (1: a failed write falls back to memory instead of failing).
        rebuild: rebuild even a fresh index.
        wait_s: how long a rank other than 0 waits for rank 0's index.
    """

    cache_dir: str | None = None
    write: bool = True
    rank: int = 0
    world_size: int = 1
    rebuild: bool = False
    wait_s: float = 7200.0


def source_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def index_location(name: str, source: str, data_dir: Path | None, cache_dir: str | os.PathLike | None) -> Path:
    """Where the index of ``source`` lives: ``cache_dir/<name>-<hash of source>.mcfidx`` when a cache
    folder is configured (``data.index_cache``: read-only data), else ``data_dir/.mcf/<name>.mcfidx``
    (``data_dir`` None: ``$MCF_CACHE/index``, for sources with no local folder, e.g. remote shards)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser() / f"{name}-{source_hash(source)}.mcfidx"
    if data_dir is None:
        return mcf_cache_dir() / "index" / f"{name}-{source_hash(source)}.mcfidx"
    return data_dir / INDEX_DIR / f"{name}.mcfidx"


def _writable(path: Path) -> bool:
    """Whether ``path``'s folder exists and is writable, or could be created."""
    p = path.parent
    while not p.exists():
        if p.parent == p:
            return False
        p = p.parent
    return os.access(p, os.W_OK | os.X_OK)


def _try_open(path: Path, fresh: Callable[[IndexFile], bool]) -> IndexFile | None:
    try:
        idx = IndexFile.open(path)
        return idx if fresh(idx) else None
    except (OSError, ValueError, KeyError, TypeError, IndexError):  # damaged or tampered: rebuilt
        return None


def open_or_build(
    path: Path | None,
    *,
    build: Callable[[], tuple[dict[str, Any], dict[str, np.ndarray]]],
    fresh: Callable[[IndexFile], bool],
    what: str,
    options: IndexOptions | None = None,
) -> IndexFile:
    """The index at ``path``: opened when it is fresh, else built by rank 0 and waited for by the others.

    Args:
        path: index file; None = build in memory (not cached).
        build: scans the data, returns ``(meta, arrays)``.
        fresh: whether an opened index still describes the data (the source's change test).
        what: the data, for messages.
        options: ``rank`` (only rank 0 builds; the others poll ``path`` for a fresh index for up to
            ``wait_s`` seconds: no process group needed, works on a shared file system across
            nodes), ``world_size``, ``rebuild`` (rank 0 rebuilds even a fresh index).

    Raises:
        DataError: a rank other than 0 waited ``wait_s`` in vain; rank 0 of several could not write
            an index where it could create files (full disk, quota): it fails at once rather than
            leave the other ranks waiting.

    Where no file can be created (read-only data, no ``data.index_cache``) every rank builds the
    index in memory, with a warning saying how to cache it.
    """
    opts = options or IndexOptions()
    if path is None:
        return IndexFile(*build())
    if not opts.rebuild and (idx := _try_open(path, fresh)) is not None:
        return idx
    if not path.exists() and not _writable(path):
        log.warning(
            "cannot write an index next to %s: every rank scans it (set data.index_cache to a writable dir)", what
        )
        return IndexFile(*build())
    if opts.rank != 0:
        deadline, sleep = time.monotonic() + opts.wait_s, POLL_S[0]
        log.info("waiting for rank 0 to index %s (%s)", what, path)
        while time.monotonic() < deadline:
            time.sleep(sleep)
            sleep = min(POLL_S[1], sleep * 2)
            if (idx := _try_open(path, fresh)) is not None:
                return idx
        raise DataError(
            f"waited {opts.wait_s:.0f} s for rank 0 to write the index of {what} at {path}; "
            "run `mcf data index` on it first, or raise data.index_wait_s"
        )
    t0 = time.monotonic()
    try:  # before the scan: creating the folder inside the data changes the data's mtime
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass
    meta, arrays = build()
    try:
        write_index(path, meta, arrays)
    except OSError as e:
        if opts.world_size > 1:
            raise DataError(
                f"cannot write the index of {what} to {path} ({e.strerror or e}), which the other ranks wait for; "
                "free space there or set data.index_cache"
            ) from None
        log.warning("cannot write the index of %s to %s (%s): not cached", what, path, e.strerror or e)
        return IndexFile(meta, arrays)
    log.info("indexed %s in %.1f s -> %s", what, time.monotonic() - t0, path)
    return IndexFile.open(path)


# -- key lists (the paper's LMDB layout) ----------------------------------------------------------------
KEYS_FORMAT = "mcf-key-index"
KEYS_VERSION = 1


def _file_stamp(path: Path) -> dict[str, int]:
    st = os.stat(path)
    recent = time.time_ns() - st.st_mtime_ns < RACY_NS
    return {"size": st.st_size, "mtime_ns": -1 if recent else st.st_mtime_ns, "ino": st.st_ino}


def open_key_list(keys_file: str | os.PathLike, options: IndexOptions | None = None) -> PackedStrings:
    """The keys of a key-list file (non-blank lines, stripped), packed, cached next to it (or in
    ``options.cache_dir``); the cache is fresh while the file's size, mtime and inode are unchanged."""
    kf, opts = Path(keys_file), options or IndexOptions()
    path = index_location(f"keys-{kf.name}", str(kf.resolve()), kf.parent, opts.cache_dir) if opts.write else None

    def build():
        stamp = _file_stamp(kf)
        keys = pack_lines(kf.read_bytes())
        return {"format": KEYS_FORMAT, "version": KEYS_VERSION, "count": len(keys), **stamp}, keys.arrays("keys")

    def fresh(idx: IndexFile) -> bool:
        m = idx.meta
        if m.get("format") != KEYS_FORMAT or m.get("version") != KEYS_VERSION or m.get("mtime_ns") == -1:
            return False
        st = os.stat(kf)
        return (m["size"], m["mtime_ns"], m["ino"]) == (st.st_size, st.st_mtime_ns, st.st_ino)

    idx = open_or_build(path, build=build, fresh=fresh, what=f"key list {kf}", options=opts)
    return PackedStrings.from_index(idx, "keys")
