"""webdataset tar shards as a data source: the shard list, its index, the datasets and the sampler.

``--data`` names shards as a brace pattern (``/data/laion_face/{00000..09999}.tar``, also
``{a,b}`` lists), a directory whose top level holds ``.tar`` files (and no images or
sub-directories), one ``.tar`` file, or a text file listing shard paths (relative to the list) or
URLs, one a line (``#`` comments). A shard is *local* (a path, ``file://``) or *remote*
(``pipe:COMMAND`` whose stdout is the tar; any fsspec URL such as ``s3://``, with ``fsspec`` and
its protocol package installed).

**The index** (``.mcf/shards*.mcfidx`` next to the shards, or in ``data.index_cache``; built on
first use by rank 0, or by ``mcf data index``) holds each shard's image-sample count and, for local
shards, each sample's image byte range (8-12 bytes a sample). Local shards are indexed from their
tar headers alone; remote ones are streamed once to be counted. The index is fresh while the shard
list and every local shard's size and mtime are unchanged (changed shards alone are re-read); a
remote shard is trusted until ``mcf data index --rebuild``. A shard damaged where the indexer meets
it keeps the samples before the damage (the rest are counted as bad in the index and reported).

**Local shards are read in place**: a sample is one ``pread`` of its image bytes, so they are an
indexed source like the others (either loader, same batches, exact resume, bad samples substituted
and counted by :class:`~mcf.data.core.source.SampleSource`), with their own epoch order
(:class:`ShardSampler`): shards shuffled per ``(seed, epoch)``, their samples shuffled within
consecutive windows of ``data.shuffle_buffer`` samples (a bounded shuffle: a window spans one or
two shards), and that global order dealt over the ranks like the indexed sources' (rank ``r`` takes
every ``world_size``-th position), so the consumed samples are always a prefix of the order. Nothing
of size N is materialised: a batch's indices are computed on demand from per-shard arrays and the
permutations of the windows it touches.

**Remote shards are streamed** (:mod:`mcf.data.loaders.shard_stream`, PyTorch loader only).

Numpy only: DALI's spawned source workers unpickle :class:`ShardDataset` and :class:`ShardSampler`.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import itertools
import logging
import math
import os
import re
import select
import signal
import stat
import subprocess
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from mcf.data.core.decode import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, BadImage, decode_rgb, max_file_bytes
from mcf.data.core.index import IndexFile, IndexOptions, PackedStrings, index_location, open_or_build, source_hash
from mcf.data.core.sampler import RankShare
from mcf.data.core.tar_index import count_stream, index_tar
from mcf.errors import DataError

log = logging.getLogger(__name__)

FORMAT = "mcf-shard-index"
VERSION = 1
MANIFEST_FORMAT = "mcf-shards"
_BRACE = re.compile(r"\{([^{}]*)\}")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


# -- naming shards -----------------------------------------------------------------------------------
MAX_SHARDS = 1_000_000  # shards one --data may name (LAION-5B in 10k-sample shards is 500k)


def _brace_parts(pattern: str) -> list[Sequence[str]]:
    """``pattern`` as a product of parts, each a sequence of alternatives, none materialised: a literal
    is ``[text]``, ``{a..b}`` a lazy :class:`_Range`, ``{x,y}`` its list; other braces are literal."""
    parts: list[Sequence[str]] = []
    pos = 0
    for m in _BRACE.finditer(pattern):
        body = m.group(1)
        rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
        if rng is None and "," not in body:
            continue  # kept literally, with what follows
        parts.append([pattern[pos : m.start()]])
        parts.append(_Range(*rng.groups()) if rng else body.split(","))
        pos = m.end()
    parts.append([pattern[pos:]])
    return parts


class _Range(Sequence[str]):
    """``{a..b}`` as bash and webdataset expand it: ``{0..10}`` is ``0 1 ... 10``; zero-padded to the
    wider bound only when a bound is written with a leading zero (``{00..10}``: ``00 01 ... 10``);
    ``{3..1}`` counts down."""

    def __init__(self, a: str, b: str):
        self.width = max(len(a), len(b)) if (len(a) > 1 and a[0] == "0") or (len(b) > 1 and b[0] == "0") else 0
        lo, hi = int(a), int(b)
        self.range = range(lo, hi + 1) if hi >= lo else range(lo, hi - 1, -1)
        self.n = abs(hi - lo) + 1  # len() overflows past 2**63 (`{0..99999999999999999999}`)

    def __len__(self) -> int:
        return len(self.range)

    def __getitem__(self, i):  # type: ignore[override]
        return str(self.range[i]).zfill(self.width)


def brace_count(pattern: str) -> int:
    """How many names :func:`expand_braces` gives for ``pattern``, computed without expanding it."""
    return math.prod(_count(p) for p in _brace_parts(pattern))


def _count(part: Sequence[str]) -> int:
    return part.n if isinstance(part, _Range) else len(part)


def expand_braces(pattern: str, limit: int = MAX_SHARDS) -> list[str]:
    """``a{00..02}b{x,y}`` -> ``a00bx a00by a01bx ...``: numeric ranges (see :class:`_Range`) and comma
    lists, as webdataset's brace expansion; other braces are kept literally. More than ``limit``
    names is a :class:`DataError`, raised before anything is expanded."""
    parts = _brace_parts(pattern)
    n = math.prod(_count(p) for p in parts)
    if n > limit:
        raise DataError(f"{pattern[:200]} names {n:,} shards, more than the limit of {limit:,}")
    return ["".join(t) for t in itertools.product(*parts)]


def is_remote(url: str) -> bool:
    """``pipe:`` commands and URLs other than ``file://`` are streamed, not read in place."""
    return url.startswith("pipe:") or (bool(_URL.match(url)) and not url.startswith("file://"))


def _local(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def _is_lmdb_file(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            return f.read(24)[16:20] == b"\xde\xc0\xef\xbe"
    except OSError:
        return False


def _is_shard_dir(p: Path) -> bool:
    if (p / "data.mdb").exists():
        return False
    manifest = p / "manifest.json"
    if manifest.is_file():
        import json

        try:
            return json.loads(manifest.read_text()).get("format") == MANIFEST_FORMAT
        except (OSError, ValueError):
            return False
    tars = False
    try:
        for e in os.scandir(p):
            if e.name.startswith("."):
                continue
            if e.is_dir() or e.name.lower().endswith(IMAGE_EXTENSIONS):
                return False
            tars = tars or e.name.endswith(".tar")
    except OSError:
        return False
    return tars


def is_shard_spec(path: str | os.PathLike) -> bool:
    """Whether ``--data`` names webdataset shards (see the module docstring for the forms)."""
    s = str(path)
    if s.startswith("pipe:") or _URL.match(s) or _BRACE.search(s) and brace_count(s) > 1:
        return True
    p = Path(s).expanduser()
    if p.is_dir():
        return _is_shard_dir(p)
    return p.is_file() and (p.suffix == ".tar" or not _is_lmdb_file(p))


@dataclass(frozen=True)
class ShardSpec:
    """The shards named by ``--data``: ``urls`` (local paths absolute), where their index goes
    (``data_dir``, ``name``), and whether any is remote."""

    urls: tuple[str, ...]
    source: str
    data_dir: Path | None
    name: str
    remote: bool

    def describe(self) -> str:
        return f"{len(self.urls)} shard(s) ({self.urls[0]}{' ...' if len(self.urls) > 1 else ''})"


def resolve_shards(spec: str | os.PathLike) -> ShardSpec:
    """The shard list of ``spec``; raises :class:`DataError` for an empty or unreadable one."""
    s = str(spec)
    if s.startswith("pipe:") or _URL.match(s) and not s.startswith("file://"):
        urls = expand_braces(s)
        data_dir, name = None, "shards"
    elif _BRACE.search(s) and brace_count(s) > 1:
        urls = [os.path.abspath(_local(u)) for u in expand_braces(s)]
        data_dir, name = Path(urls[0]).parent, f"shards-{source_hash(os.path.abspath(_local(s)))}"
    else:
        p = Path(os.path.abspath(Path(_local(s)).expanduser()))
        if p.is_dir():
            if (p / "progress.json").is_file() and not (p / "manifest.json").is_file():
                raise DataError(f"{p} is an interrupted build-shards (no manifest.json): run it again to resume")
            urls = sorted(
                str(p / e.name) for e in os.scandir(p) if e.name.endswith(".tar") and not e.name.startswith(".")
            )
            data_dir, name = p, "shards"
        elif p.suffix == ".tar":
            urls, data_dir, name = [str(p)], p.parent, f"shards-{source_hash(str(p))}"
        elif p.is_file():
            urls = _read_list(p)
            data_dir, name = p.parent, f"shards-{source_hash(str(p))}"
        else:
            raise DataError(f"data path not found: {p}")
    if not urls:
        raise DataError(f"no shards in {s}")
    remote = any(is_remote(u) for u in urls)
    for proto in {u.split("://", 1)[0] for u in urls if is_remote(u) and not u.startswith("pipe:")}:
        check_url(proto + "://")  # a missing fsspec package is a one-line error now, not bad samples later
    if not remote:
        missing = [u for u in urls if not os.path.isfile(u)]
        if missing:
            what = [u for u in missing if os.path.exists(u)]
            if what:  # a directory, a FIFO, a device: named as what it is, not "not found"
                kind = "a directory" if os.path.isdir(what[0]) else "not a regular file"
                raise DataError(f"{len(what)} of {len(urls)} shards are not tar files: {what[0]} is {kind} "
                                "(list .tar files, or pass a shard folder as --data itself)")
            raise DataError(f"{len(missing)} of {len(urls)} shards not found, e.g. {missing[0]}")
    source = s if data_dir is None else "\n".join(urls)
    return ShardSpec(tuple(urls), source, data_dir, name, remote)


def _read_list(p: Path) -> list[str]:
    try:
        text = p.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read shard list {p}: {e.strerror or e}") from None
    if b"\0" in text:
        raise DataError(
            f"{p} is a binary file: pass an image folder, an LMDB directory, shards, or an LMDB with --lmdb-keys"
        )
    try:
        lines = text.decode("utf-8-sig").splitlines()  # a byte-order mark (Windows editors) is not a path
    except UnicodeDecodeError:
        raise DataError(f"{p} is not a UTF-8 text list of shards") from None
    urls = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        names = expand_braces(line, limit=MAX_SHARDS - len(urls))  # the whole list is bounded, not each line
        if is_remote(line):
            urls.extend(names)
        else:
            urls.extend(os.path.abspath(os.path.join(p.parent, _local(u))) for u in names)
    return urls


def check_url(url: str) -> None:
    """Raise :class:`DataError` when ``url``'s protocol cannot be read here (fsspec or its package missing)."""
    if url.startswith("pipe:") or not is_remote(url):
        return
    protocol = url.split("://", 1)[0]
    try:
        import fsspec

        fsspec.get_filesystem_class(protocol)
    except ImportError as e:
        raise DataError(
            f"reading {protocol}:// shards needs fsspec and its {protocol} package ({e}); "
            "install them, or use a pipe: command (e.g. pipe:aws s3 cp URL -)"
        ) from None
    except ValueError as e:
        raise DataError(f"unknown shard URL protocol {protocol!r} in {url} ({e})") from None


STREAM_STALL_S = 120.0  # default data.stream_stall_s
MIN_PROGRESS_BYTES = 64 * 1024  # a pipe must deliver this much within every stream_stall_s seconds of waiting


class StalledStream(OSError):
    """A ``pipe:`` shard that stopped delivering data (see :class:`_DeadlineStream`)."""


class _DeadlineStream(io.RawIOBase):
    """The read end of a ``pipe:`` command's stdout, with a deadline: :data:`MIN_PROGRESS_BYTES` (or the
    end of the stream) must arrive within every ``stall_s`` seconds spent waiting for it, else
    :class:`StalledStream`. Only time blocked in this reader counts (not the time the consumer
    spends decoding between reads), so a slow consumer is never cut off, and a stream that trickles
    (a byte a minute) is as stalled as one that stops. The descriptor stays its owner's to close."""

    def __init__(self, fd: int, stall_s: float, what: str):
        self.fd, self.stall_s, self.what = fd, stall_s, what
        self.waited, self.progress = 0.0, 0
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while True:
            t0 = time.monotonic()
            ready = self._poll.poll(max(0.0, self.stall_s - self.waited) * 1000.0)
            self.waited += time.monotonic() - t0
            if ready:
                data = os.read(self.fd, len(b))
                b[: len(data)] = data
                self.progress += len(data)
                if self.progress >= MIN_PROGRESS_BYTES:
                    self.waited, self.progress = 0.0, 0
                return len(data)  # 0: end of the stream
            if self.waited >= self.stall_s:
                raise StalledStream(f"stalled: less than {MIN_PROGRESS_BYTES // 1024} KiB in {self.stall_s:g} s of "
                                    f"waiting (data.stream_stall_s) from {self.what[:200]}")


_SIG_DFL = 0
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@functools.cache
def _libc() -> ctypes.CDLL:
    """libc, loaded in the parent: a forked child must not load libraries (not async-signal-safe)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.signal.argtypes, libc.signal.restype = (ctypes.c_int, ctypes.c_void_p), ctypes.c_void_p
    return libc


def _pipe_child_init() -> None:
    """In a ``pipe:`` command's process, before exec: the default disposition for every signal and an
    empty signal mask (a loader worker ignores SIGTERM and SIGUSR1, and ignored signals survive
    exec), and SIGKILL when the process that started it dies (``PR_SET_PDEATHSIG``). Plain libc
    calls only: the forking thread may not be the main one."""
    libc = _libc()
    for sig in range(1, signal.SIGRTMIN):
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            libc.signal(sig, _SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


@contextlib.contextmanager
def open_stream(url: str, stall_s: float = STREAM_STALL_S) -> Iterator[BinaryIO]:
    """A readable byte stream of shard ``url``: a ``pipe:`` command's stdout, an fsspec URL, or a file.

    A ``pipe:`` command runs in a process group of its own, with the default signal dispositions and
    mask, and dies (SIGKILL) with the process that started it; when the stream is closed the whole
    group is killed (the command's own children too). Its stdout is read with a deadline
    (``stall_s``, see :class:`_DeadlineStream`): a stalled command is a shard that broke off.
    """
    if url.startswith("pipe:"):
        _libc()
        proc = subprocess.Popen(url[len("pipe:") :], shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                preexec_fn=_pipe_child_init, process_group=0)
        try:
            yield io.BufferedReader(_DeadlineStream(proc.stdout.fileno(), stall_s, url), 1 << 16)
        finally:
            try:  # before the shell is reaped: its pid, the group's id, cannot be reused until then
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.stdout.close()
            rc = proc.wait()
            if rc not in (0, -9):
                log.warning("shard command %r exited with status %d", url, rc)
        return
    if is_remote(url):
        check_url(url)
        import fsspec

        try:
            f = fsspec.open(url, "rb").open()
        except Exception as e:  # network, permissions, missing object: the shard's samples are bad
            raise DataError(f"cannot open {url}: {type(e).__name__}: {e}") from None
        with f:
            yield f
        return
    try:
        fd = open_regular(_local(url))
    except (OSError, BadImage) as e:
        raise DataError(f"cannot open {url}: {e}") from None
    with os.fdopen(fd, "rb") as f:
        yield f


# -- the index ---------------------------------------------------------------------------------------
def _stat(url: str) -> tuple[int, int]:
    if is_remote(url):
        return -1, -1
    try:
        st = os.stat(url)
        return st.st_size, st.st_mtime_ns
    except OSError:
        return -2, -2


def _index_one(url: str) -> tuple[list[tuple[int, int]] | int, str | None]:
    """A local shard's ``(offset, size)`` list, or a remote shard's sample count; and its damage."""
    if not is_remote(url):
        return index_tar(url)
    try:
        with open_stream(url) as f:
            return count_stream(f)
    except DataError as e:
        return 0, str(e)


def build_shard_index(
    spec: ShardSpec, old: IndexFile | None = None, workers: int = 8
) -> tuple[dict, dict[str, np.ndarray]]:
    """``(meta, arrays)`` of the index of ``spec``'s shards; entries of an ``old`` index whose shard is
    unchanged are reused (only changed or new shards are read)."""
    stats = [_stat(u) for u in spec.urls]
    reuse: dict[str, Any] = {}
    if old is not None and old.meta.get("format") == FORMAT and old.meta.get("version") == VERSION:
        o = ShardTable(old)
        for k in range(len(o)):
            url = o.url(k)
            remote_ok = (
                o.size[k] == -1 and is_remote(url) and not o.damage(k)
            )  # trusted until --rebuild; damaged: retried
            if remote_ok or (o.size[k] >= 0 and (int(o.size[k]), int(o.mtime[k])) == _stat(url)):
                reuse[url] = (o.samples(k), int(o.bad[k]), o.damage(k))
    todo = [u for u in spec.urls if u not in reuse]
    results: dict[str, tuple[Any, str | None]] = {}
    if todo:
        log.info("indexing %d shard(s) (%d reused)", len(todo), len(reuse))
        remote = any(is_remote(u) for u in todo)
        if workers > 1 and len(todo) > 1:
            import multiprocessing

            pool = (
                ThreadPoolExecutor(workers)
                if remote
                else ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
            )
            with pool:
                results = dict(
                    zip(
                        todo,
                        pool.map(_index_one, todo, chunksize=1) if remote else pool.map(_index_one, todo, chunksize=4),
                    )
                )
        else:
            results = {u: _index_one(u) for u in todo}
    counts, bads, damages, offsets, sizes = [], [], [], [], []
    for u in spec.urls:
        if u in reuse:
            samples, bad, damage = reuse[u]
        else:
            found, damage = results[u]
            samples = found if isinstance(found, list) else int(found)
            bad = 1 if damage else 0
            if damage:
                log.warning(
                    "shard %s: %s (%d image samples before it kept)",
                    u,
                    damage,
                    len(samples) if isinstance(samples, list) else samples,
                )
        if isinstance(samples, int):
            counts.append(samples)
        else:
            counts.append(len(samples))
            offsets.extend(s[0] for s in samples)
            sizes.extend(s[1] for s in samples)
        bads.append(bad)
        damages.append((damage or "").encode())
    counts_a = np.array(counts, dtype=np.int64)
    start = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts_a, out=start[1:])
    arrays: dict[str, np.ndarray] = {
        **PackedStrings.from_bytes(os.fsencode(u) for u in spec.urls).arrays("urls"),
        **PackedStrings.from_bytes(damages).arrays("damage"),
        "count": counts_a,
        "start": start,
        "bad": np.array(bads, dtype=np.int64),
        "size": np.array([s[0] for s in stats], dtype=np.int64),
        "mtime": np.array([s[1] for s in stats], dtype=np.int64),
    }
    if not spec.remote:
        big = max((s[0] for s in stats), default=0) >= 2**32
        arrays["offset"] = np.array(offsets, dtype=np.uint64 if big else np.uint32)
        arrays["length"] = np.array(sizes, dtype=np.uint64 if max(sizes, default=0) >= 2**32 else np.uint32)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "count": int(start[-1]),
        "shards": len(counts),
        "remote": spec.remote,
        "source": spec.source if spec.data_dir is None else None,
    }
    return meta, arrays


def shard_index_fresh(spec: ShardSpec, idx: IndexFile) -> bool:
    if (
        idx.meta.get("format") != FORMAT
        or idx.meta.get("version") != VERSION
        or bool(idx.meta.get("remote")) != spec.remote
    ):
        return False
    t = ShardTable(idx)
    if len(t) != len(spec.urls) or any(t.url(k) != u for k, u in enumerate(spec.urls)):
        return False
    for k, u in enumerate(spec.urls):
        if t.size[k] == -1:  # remote: trusted, unless it could not be read to its end (retried at each start)
            if t.damage(k):
                return False
        elif (int(t.size[k]), int(t.mtime[k])) != _stat(u):
            return False
    return True


class ShardTable:
    """Typed view of a shard index: per shard ``count``, ``start`` (cumulative, S + 1), ``bad``,
    ``size``, ``mtime``; per sample (local shards) ``offset`` and ``length``."""

    def __init__(self, idx: IndexFile):
        a = idx.arrays
        self.idx = idx
        self.urls = PackedStrings.from_index(idx, "urls")
        self.damages = PackedStrings.from_index(idx, "damage")
        self.count, self.start, self.bad, self.size, self.mtime = (
            a["count"],
            a["start"],
            a["bad"],
            a["size"],
            a["mtime"],
        )
        self.offset, self.length = a.get("offset"), a.get("length")

    def __len__(self) -> int:
        return len(self.count)

    @property
    def total(self) -> int:
        return int(self.start[-1])

    def url(self, k: int) -> str:
        return self.urls[k]

    def damage(self, k: int) -> str | None:
        return self.damages[k] or None

    def samples(self, k: int) -> list[tuple[int, int]] | int:
        if self.offset is None:
            return int(self.count[k])
        a, b = int(self.start[k]), int(self.start[k + 1])
        return list(zip(self.offset[a:b].tolist(), self.length[a:b].tolist()))

    def locate(self, i: int) -> tuple[int, int]:
        """``(shard, sample within it)`` of global sample ``i``."""
        k = int(np.searchsorted(self.start, i, side="right")) - 1
        return k, i - int(self.start[k])


def open_shard_index(spec: ShardSpec, options: IndexOptions | None = None, workers: int = 8) -> ShardTable:
    opts = options or IndexOptions()
    path = index_location(spec.name, spec.source, spec.data_dir, opts.cache_dir) if opts.write else None

    def build():
        old = None
        if path is not None and path.exists():
            try:
                old = IndexFile.open(path)
            except (OSError, ValueError):
                old = None
        return build_shard_index(spec, old, workers)

    idx = open_or_build(
        path,
        build=build,
        fresh=lambda i: shard_index_fresh(spec, i),
        what=spec.describe(),
        options=opts,
    )
    return ShardTable(idx)


# -- datasets ----------------------------------------------------------------------------------------
def open_regular(path: str) -> int:
    """A read-only descriptor of the regular file ``path``; ``BadImage`` for anything else. Opened
    with ``O_NONBLOCK`` and checked after opening: a shard replaced by a FIFO mid-run would block
    ``open`` until a writer came (never), a device would never end."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise BadImage("not a regular file (replaced by a FIFO, a device or a folder?)")
    return fd


class _Handles:
    """Open shard files of this process (at most ``limit``, least recently used closed first);
    forgotten after a fork."""

    def __init__(self, limit: int = 16):
        self.limit, self.pid, self.fds = limit, -1, OrderedDict()

    def get(self, path: str) -> int:
        if self.pid != os.getpid():
            self.pid, self.fds = os.getpid(), OrderedDict()  # inherited descriptors: left to the parent
        fd = self.fds.pop(path, None)
        if fd is None:
            fd = open_regular(path)
            while len(self.fds) >= self.limit:
                os.close(self.fds.popitem(last=False)[1])
        self.fds[path] = fd
        return fd


class ShardDataset:
    """Local webdataset shards read in place: ``read_bytes(i)`` is one ``pread`` of sample ``i``'s
    image (an :class:`~mcf.data.formats.datasets.EncodedImageDataset`; see the module docstring)."""

    def __init__(self, spec: ShardSpec, table: ShardTable, *, max_pixels: int = DEFAULT_MAX_PIXELS):
        if table.total == 0:
            raise DataError(f"no image samples (members .jpg, .jpeg, .png, .webp) in {spec.describe()}")
        self.spec, self.table, self.max_pixels = spec, table, max_pixels
        self._handles = _Handles()

    def __len__(self) -> int:
        return self.table.total

    def read_bytes(self, i: int) -> bytes:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} samples")
        k, _ = self.table.locate(i)
        off, n = int(self.table.offset[i]), int(self.table.length[i])
        if n > max_file_bytes(self.max_pixels):  # not read into memory, as for a folder's files
            raise BadImage(f"member too large ({n} > {max_file_bytes(self.max_pixels)} bytes)")
        try:
            return os.pread(self._handles.get(self.table.url(k)), n, off)  # short (a bad sample) when the shard was cut
        except OSError as e:
            raise BadImage(f"unreadable shard ({e.strerror or e})") from None

    def __getitem__(self, i: int):
        return decode_rgb(self.read_bytes(i), self.max_pixels)

    def name(self, i: int) -> str:
        k, j = self.table.locate(i)
        url, off = self.table.url(k), int(self.table.offset[i])
        member = ""
        try:
            head = os.pread(self._handles.get(url), 100, off - 512)
            member = head.split(b"\0", 1)[0].decode("utf-8", "replace")
        except (OSError, BadImage):  # gone, or no longer a regular file: named by number
            pass
        return f"{url}[{member or f'sample {j}'}]"

    def shard_counts(self) -> np.ndarray:
        return np.asarray(self.table.count)

    def make_sampler(self, *, rank: int, world_size: int, seed: int, window: int) -> ShardSampler:
        return ShardSampler(self.shard_counts(), rank=rank, world_size=world_size, seed=seed, window=window)

    def __getstate__(self) -> dict[str, Any]:
        return {"spec": self.spec, "table": self.table.idx, "max_pixels": self.max_pixels}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["spec"], ShardTable(state["table"]), max_pixels=state["max_pixels"])


class StreamedShards:
    """Remote shards: a length and names, no random access (read by :mod:`mcf.data.loaders.shard_stream`)."""

    def __init__(self, spec: ShardSpec, table: ShardTable, *, max_pixels: int = DEFAULT_MAX_PIXELS):
        if table.total == 0:
            raise DataError(f"no image samples in {spec.describe()}")
        self.spec, self.table, self.max_pixels = spec, table, max_pixels

    def __len__(self) -> int:
        return self.table.total

    def name(self, i: int) -> str:
        k, j = self.table.locate(i)
        return f"{self.table.url(k)}[sample {j}]"

    def read_bytes(self, i: int) -> bytes:
        raise DataError("remote shards are streamed, not read by index: use the PyTorch loader (data.loader=torch)")

    def shard_counts(self) -> np.ndarray:
        return np.asarray(self.table.count)


def open_shards(
    spec_text: str | os.PathLike,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    index: IndexOptions | None = None,
    workers: int = 8,
) -> ShardDataset | StreamedShards:
    spec = resolve_shards(spec_text)
    table = open_shard_index(spec, index, workers)
    cls = StreamedShards if spec.remote else ShardDataset
    return cls(spec, table, max_pixels=max_pixels)


# -- the epoch order ---------------------------------------------------------------------------------
class ShardSampler(RankShare):
    """The epoch order of a shard set, a pure function of ``(seed, epoch)``, split over ranks like the
    indexed sources' order, so a run resumes exactly and, from its global sample count, on another
    world size too.

    Epoch ``e``'s order is global (the same for every world size): the shards in a permutation drawn
    from ``(seed, e)``, their samples concatenated (``N`` in all), each window ``[w C, (w + 1) C)`` of
    ``C = window`` consecutive positions permuted (drawn from ``(seed, e, w C)``). From a global
    ``offset``, rank ``r`` of ``W`` takes the positions ``offset + r + W j``: the consumed positions are
    always a prefix of the order, and a batch of ``B`` reads ``B`` of ``B W`` consecutive positions
    (one or a few windows, one or a few shards). Nothing of size ``N`` is built: positions become
    sample ids through per-shard arrays and the permutations of the windows they fall in.

    Interface: :class:`~mcf.data.core.sampler.RankShare`'s (``(epoch, index)`` pairs, ``per_rank``,
    ``share``, ``set_offset``, ``take``), the interface of the indexed sources' sampler too.

    Args:
        counts: samples per shard, in shard-list order.
        window: shuffle window (``data.shuffle_buffer``), samples.
    """

    CACHED_WINDOWS = 64

    def __init__(self, counts: np.ndarray, *, rank: int = 0, world_size: int = 1, seed: int = 0, window: int = 2048):
        if window < 1:
            raise ValueError("window must be >= 1")
        self.counts = np.asarray(counts, dtype=np.int64)
        self.start = np.concatenate([[0], np.cumsum(self.counts)])
        super().__init__(int(self.start[-1]), rank, world_size, seed)
        self.window = window
        self._order: tuple[int, np.ndarray, np.ndarray] | None = None
        self._perms: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def _shard_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard ids in epoch order, their cumulative sample counts (S + 1))."""
        if self._order is None or self._order[0] != epoch:
            order = np.random.default_rng([self.seed & 0xFFFFFFFF, epoch, 0x73686172]).permutation(len(self.counts))
            cum = np.concatenate([[0], np.cumsum(self.counts[order])])
            self._order = (epoch, order, cum)
        return self._order[1], self._order[2]

    def _window_perm(self, epoch: int, first: int, n: int) -> np.ndarray:
        """The permutation of the window starting at global position ``first`` (``n`` samples)."""
        key = (epoch, first)
        perm = self._perms.pop(key, None)
        if perm is None:
            perm = np.random.default_rng([self.seed & 0xFFFFFFFF, epoch, first, 0x77696E64]).permutation(n)
            while len(self._perms) >= self.CACHED_WINDOWS:
                self._perms.popitem(last=False)
        self._perms[key] = perm
        return perm

    def order_at(self, epoch: int, g: np.ndarray) -> np.ndarray:
        """Sample ids at global positions ``g`` (int64 array) of ``epoch``'s order."""
        c = self.window
        w = g // c
        shuffled = np.empty_like(g)
        for wid in np.unique(w).tolist():
            sel = w == wid
            first = wid * c
            shuffled[sel] = first + self._window_perm(epoch, first, min(c, self.num_samples - first))[g[sel] - first]
        order, cum = self._shard_order(epoch)
        k = np.searchsorted(cum, shuffled, side="right") - 1
        return self.start[order[k]] + (shuffled - cum[k])

    def __getstate__(self) -> dict:
        return dict(self.__dict__, _order=None, _perms=OrderedDict())
