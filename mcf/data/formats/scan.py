"""The image-folder scan and its cached index.

The scan follows symbolic links (people link folders together) but lists every directory once, by
the ``(st_dev, st_ino)`` of the real directory: a symlink loop ends, a self-link adds nothing, and a
folder reached through two links is listed once. Directories reached by real paths come first;
links are then followed in sorted path order, so a linked folder is listed under the first link (in
that order) that leads to it, unless it is already inside the tree. Files are every non-hidden
name with an image extension that is not a directory (a dangling link is kept: reading it is a bad
sample), sorted by relative path as before.

The index (``<folder>/.mcf/folder.mcfidx``, or in ``data.index_cache``) stores each file as its base
name plus the number of its directory (``PackedStrings`` + uint16/uint32), and every directory with
its modification time (ns) and a digest of its entry names. It is fresh while every listed
directory still has the recorded mtime: adding, removing or renaming a file or a link changes its
directory's mtime, so the test costs one ``stat`` per directory, not per file. A directory modified
within :data:`RACY_NS` of the scan (an mtime need not tick between two quick changes) is instead
listed again at each start and its names compared with the digest. Limits: a file rewritten in
place is not seen (the index holds names only; contents are read at every step anyway); a symlink
retargeted within that window under the same name is not seen; clocks of a file server and a client that disagree
by more than that window, or a tool that restores old mtimes after changing a tree (``rsync -a`` of
a different tree), defeat it — run ``mcf data index DIR --rebuild`` then.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

import numpy as np

from mcf.data.core.decode import IMAGE_EXTENSIONS
from mcf.data.core.index import (
    INDEX_DIR,
    RACY_NS,
    IndexFile,
    IndexOptions,
    PackedStrings,
    index_location,
    open_or_build,
)

log = logging.getLogger(__name__)

FORMAT = "mcf-folder-index"
VERSION = 1
UNKNOWN_MTIME = -1


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def listing_hash(names: list[str]) -> int:
    """64-bit digest of a directory's sorted entry names (the change test of a too-recent mtime)."""
    h = hashlib.blake2b(b"\0".join(os.fsencode(n) for n in names), digest_size=8)
    return int.from_bytes(h.digest(), "little", signed=True)


def _entries(full: str, top: bool) -> list[os.DirEntry]:
    return sorted((e for e in os.scandir(full) if not (top and e.name == INDEX_DIR)), key=lambda e: e.name)


def walk_images(root: Path) -> tuple[list[str], list[tuple[str, int, int]]]:
    """``(files, dirs)``: image paths relative to ``root`` (sorted) and every directory listed as
    ``(relative path ("" for root), mtime in ns or UNKNOWN_MTIME when too recent, listing hash)``."""
    root = Path(root)
    started = time.time_ns()
    visited: set[tuple[int, int]] = set()
    files: list[str] = []
    dirs: list[tuple[str, int, int]] = []
    links: list[str] = []  # symlinks to directories, followed after every real path

    def walk(start: str) -> None:
        stack = [start]
        while stack:
            rel = stack.pop()
            full = os.path.join(root, rel)
            try:
                st = os.stat(full)
                entries = _entries(full, rel == "")
            except OSError as e:
                log.warning("image folder scan: skipping %s (%s)", full, e.strerror or e)
                continue
            key = (st.st_dev, st.st_ino)
            if key in visited:
                continue
            visited.add(key)
            mtime = st.st_mtime_ns if started - st.st_mtime_ns >= RACY_NS else UNKNOWN_MTIME
            dirs.append((rel, mtime, listing_hash([e.name for e in entries])))
            subdirs = []
            for e in entries:
                name, sub = e.name, os.path.join(rel, e.name)
                try:
                    if e.is_dir(follow_symlinks=False):
                        subdirs.append(sub)
                    elif e.is_symlink():
                        if e.is_dir():
                            links.append(sub)
                        elif _is_image(name) and (e.is_file() or not os.path.exists(e.path)):
                            files.append(sub)  # a link to a file, or a dangling one
                    elif _is_image(name) and e.is_file(follow_symlinks=False):
                        files.append(sub)
                except OSError:
                    continue
            stack.extend(reversed(subdirs))

    walk("")
    while links:
        links.sort()
        walk(links.pop(0))
    files.sort()
    return files, dirs


def scan_image_folder(root: Path) -> list[str]:
    """Relative paths of the image files under ``root``, sorted (deterministic across ranks)."""
    return walk_images(root)[0]


def build_folder_index(root: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """``(meta, arrays)`` of the index of ``root`` (see the module docstring)."""
    files, dirs = walk_images(root)
    dir_ids = {d[0]: i for i, d in enumerate(dirs)}
    parents = np.fromiter((dir_ids[os.path.dirname(f)] for f in files), dtype=np.int64, count=len(files))
    names = PackedStrings.from_bytes(os.fsencode(os.path.basename(f)) for f in files)
    del files
    dir_names = PackedStrings.from_bytes(os.fsencode(d[0]) for d in dirs)
    meta = {"format": FORMAT, "version": VERSION, "count": len(names), "dirs": len(dirs)}
    arrays = {
        **names.arrays("files"),
        "file_dir": parents.astype(np.uint16 if len(dirs) <= 2**16 else np.uint32),
        **dir_names.arrays("dirs"),
        "dir_mtime": np.array([d[1] for d in dirs], dtype=np.int64),
        "dir_hash": np.array([d[2] for d in dirs], dtype=np.int64),
    }
    return meta, arrays


def folder_index_fresh(root: Path, idx: IndexFile) -> bool:
    """Whether every directory listed in ``idx`` still has its recorded mtime (one ``stat`` each;
    a directory whose mtime was too recent to trust is listed again and its names compared)."""
    if idx.meta.get("format") != FORMAT or idx.meta.get("version") != VERSION:
        return False
    dirs = PackedStrings.from_arrays(idx.arrays, "dirs")
    mtimes, hashes = idx.arrays["dir_mtime"], idx.arrays["dir_hash"]
    for i in range(len(dirs)):
        full = os.path.join(root, dirs[i])
        try:
            if mtimes[i] == UNKNOWN_MTIME:
                if listing_hash([e.name for e in _entries(full, i == 0)]) != hashes[i]:
                    return False
            elif os.stat(full).st_mtime_ns != mtimes[i]:
                return False
        except OSError:
            return False
    return True


class FolderIndex:
    """The cached file list of an image folder: ``len``, ``relpath(i)``, ``path_bytes(i)``."""

    def __init__(self, root: Path, idx: IndexFile):
        self.root, self.idx = Path(root), idx
        self.files = PackedStrings.from_index(idx, "files")
        self.dirs = PackedStrings.from_index(idx, "dirs")
        self.file_dir = idx.arrays["file_dir"]
        self._root_b = os.fsencode(self.root)

    def __len__(self) -> int:
        return len(self.files)

    def path_bytes(self, i: int) -> bytes:
        d = self.dirs.get(int(self.file_dir[i]))
        return os.path.join(self._root_b, d, self.files.get(i)) if d else os.path.join(self._root_b, self.files.get(i))

    def relpath(self, i: int) -> str:
        return os.path.relpath(os.fsdecode(self.path_bytes(i)), self.root)

    @property
    def nbytes(self) -> int:
        return (
            self.files.nbytes + int(self.file_dir.nbytes) + self.dirs.nbytes + int(self.idx.arrays["dir_mtime"].nbytes)
        )

    def __getstate__(self) -> dict:
        return {"root": self.root, "idx": self.idx}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["root"], state["idx"])


def open_folder_index(root: str | os.PathLike, options: IndexOptions | None = None) -> FolderIndex:
    """The index of image folder ``root``: mapped when fresh, else built (rank 0) and written
    atomically, the other ranks waiting for it (see :func:`mcf.data.core.index.open_or_build`)."""
    root, opts = Path(root), options or IndexOptions()
    path = index_location("folder", str(root.resolve()), root, opts.cache_dir) if opts.write else None
    idx = open_or_build(
        path,
        build=lambda: build_folder_index(root),
        fresh=lambda i: folder_index_fresh(root, i),
        what=f"image folder {root}",
        options=opts,
    )
    return FolderIndex(root, idx)
