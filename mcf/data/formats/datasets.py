"""Datasets of encoded images: an image folder, our LMDB format, and the paper's LMDB layout.

Every dataset maps an index to encoded bytes (:meth:`read_bytes`), a name for error messages
(:meth:`name`) and, through ``__getitem__``, a decoded RGB PIL image. The length is fixed and
checked against the index when the dataset is opened, so ``__len__`` and the index never disagree.
LMDB environments are opened lazily in the process that reads them (each DataLoader/DALI worker),
``readonly=True, lock=False``, and are dropped when the dataset is pickled.

Our LMDB format (written by :func:`mcf.data.tools.lmdb_build.build_lmdb`), a directory holding:

* ``data.mdb``: values ``b"%09d" % i`` -> encoded image, ``b"name:%09d" % i`` -> source name,
  ``b"length"`` -> the count as decimal text (so it is also readable as the paper's layout);
* ``manifest.json``, written last (its presence marks a complete build): ``format``, ``version``,
  ``count``, optional ``splits`` (name -> ``[start, stop)``), ``provenance``, ``build`` options.

The paper's layout: an LMDB whose values are encoded images under arbitrary keys, whose ``length``
key holds the count, plus a text file listing the keys, one per line (``--lmdb-keys``).

File lists and key lists are compact shared indexes (:mod:`mcf.data.core.index`): a memory-mapped file
of packed strings, cached next to the data (or in ``data.index_cache``), a few bytes a sample beyond
the name itself. Every LMDB file is checked against its own meta pages before it is mapped
(:mod:`mcf.data.formats.lmdb_check`): a file cut short or garbage is a one-line error, never a SIGBUS.
webdataset shards are :mod:`mcf.data.formats.shards`.
"""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path
from typing import Any

from PIL import Image

from mcf.data.core.decode import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, BadImage, decode_rgb, max_file_bytes, read_file
from mcf.data.core.index import IndexOptions, open_key_list
from mcf.data.formats.lmdb_check import check_lmdb_file
from mcf.data.formats.scan import open_folder_index, scan_image_folder
from mcf.errors import DataError

MANIFEST = "manifest.json"
FORMAT = "mcf-lmdb"
FORMAT_VERSION = 1
LENGTH_KEY = b"length"


def image_key(i: int) -> bytes:
    return b"%09d" % i


def name_key(i: int) -> bytes:
    return b"name:%09d" % i


class EncodedImageDataset:
    """Base class: ``read_bytes(i)``, ``name(i)``, ``__getitem__(i) -> PIL RGB``, ``__len__``."""

    max_pixels: int = DEFAULT_MAX_PIXELS

    def __len__(self) -> int:
        raise NotImplementedError

    def read_bytes(self, i: int) -> bytes:
        raise NotImplementedError

    def name(self, i: int) -> str:
        raise NotImplementedError

    def __getitem__(self, i: int) -> Image.Image:
        """The decoded RGB image; raises :class:`~mcf.data.core.decode.BadImage` on a bad sample."""
        if not 0 <= i < len(self):
            raise IndexError(i)
        return decode_rgb(self.read_bytes(i), self.max_pixels)

    def _check_index(self, i: int) -> int:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} samples")
        return i


def _tar_folder(root: Path, depth: int = 3, budget: int = 10_000) -> Path | None:
    """The first folder under ``root`` (``depth`` levels, ``budget`` entries looked at) that holds
    ``.tar`` files: webdataset shards passed as an image folder one level too high."""
    todo = [(root, 0)]
    while todo and budget > 0:
        d, level = todo.pop(0)
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)[:budget]
        except OSError:
            continue
        budget -= len(entries)
        if any(e.name.endswith(".tar") and not e.name.startswith(".") for e in entries):
            return Path(d)
        todo.extend((Path(e.path), level + 1) for e in entries if level + 1 < depth and e.is_dir(follow_symlinks=False))
    return None


class ImageFolderDataset(EncodedImageDataset):
    """All images under ``root`` (recursive, symlinks followed, each directory once; sorted;
    extensions in ``IMAGE_EXTENSIONS``), listed by a cached :class:`~mcf.data.formats.scan.FolderIndex`."""

    def __init__(
        self, root: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS, index: IndexOptions | None = None
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"image folder not found: {self.root}")
        self.max_pixels = max_pixels
        self.index = open_folder_index(self.root, index)
        if not len(self.index):
            tars = _tar_folder(self.root)
            hint = f"; {tars} holds .tar shards: pass it as --data" if tars is not None else ""
            raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {self.root}{hint}")

    def __len__(self) -> int:
        return len(self.index)

    def read_bytes(self, i: int) -> bytes:
        """The file's bytes; :class:`~mcf.data.core.decode.BadImage` if it cannot be read (see ``read_file``)."""
        return read_file(self.index.path_bytes(self._check_index(i)), max_file_bytes(self.max_pixels))

    def name(self, i: int) -> str:
        return os.fsdecode(self.index.path_bytes(i))


__all__ = ["scan_image_folder"]  # re-exported for the converter

_ENVS: dict[tuple[str, bool, int], Any] = {}
_ENVS_PID = -1


def _shared_env(path: Path, subdir: bool):
    """One read-only environment per (file, process): py-lmdb refuses to open an LMDB twice in a
    process, and an environment inherited through fork must not be used."""
    global _ENVS_PID
    import lmdb

    if _ENVS_PID != os.getpid():
        _ENVS.clear()  # inherited through fork: released (and closed) here, reopened below
        gc.collect()
        _ENVS_PID = os.getpid()
    data = path / "data.mdb" if subdir else path
    try:
        key = (str(path.resolve()), subdir, data.stat().st_ino)
    except OSError as e:
        raise DataError(f"cannot open LMDB {data}: {e.strerror or e}") from None
    env = _ENVS.get(key)
    if env is None:
        check_lmdb_file(path, subdir)  # a file cut short would SIGBUS once its pages are touched
        try:
            env = lmdb.open(
                str(path), subdir=subdir, readonly=True, lock=False, readahead=False, meminit=False, max_readers=512
            )
        except lmdb.Error as e:
            raise DataError(f"cannot open LMDB {data}: {e}") from None
        _ENVS[key] = env
    return env


def _lmdb_get(db: _LazyLMDB, key: bytes, max_bytes: int | None = None) -> bytes | None:
    """One value; a damaged page is a bad sample (:class:`BadImage`), not a crash of the reader, and
    so is a value over ``max_bytes`` (looked at in the map, never copied)."""
    import lmdb

    try:
        with db.txn(buffers=True) as txn:  # a view into the map, valid inside the transaction only
            v = txn.get(key)
            if v is None:
                return None
            if max_bytes is not None and len(v) > max_bytes:
                raise BadImage(f"value too large ({len(v)} > {max_bytes} bytes)")
            return bytes(v)
    except lmdb.Error as e:
        raise BadImage(f"LMDB read error ({type(e).__name__})") from None


class _LazyLMDB:
    """An LMDB environment opened on first use in the current process (never shared by fork)."""

    def __init__(self, path: Path, subdir: bool):
        self.path, self.subdir = path, subdir
        self._env = None
        self._pid = -1

    def txn(self, buffers: bool = False):
        if self._env is None or self._pid != os.getpid():
            # drop an environment inherited through fork first: while referenced it stays open, and
            # py-lmdb refuses to open the same file again in this process
            self._env = None
            self._env = _shared_env(self.path, self.subdir)
            self._pid = os.getpid()
        return self._env.begin(write=False, buffers=buffers)

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "subdir": self.subdir, "_env": None, "_pid": -1}

    def close(self) -> None:
        self._env = None


def read_manifest(path: Path) -> dict[str, Any] | None:
    m = path / MANIFEST
    if not m.is_file():
        return None
    try:
        return json.loads(m.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"unreadable manifest {m}: {e}") from None


class LMDBDataset(EncodedImageDataset):
    """Our LMDB format (see the module docstring); ``split`` selects a range listed in the manifest."""

    def __init__(self, path: str | os.PathLike, *, split: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.path = Path(path)
        self.max_pixels = max_pixels
        if not self.path.exists():
            raise DataError(f"LMDB not found: {self.path}")
        manifest = read_manifest(self.path)
        if manifest is None:
            hint = (
                " (an interrupted build: run `mcf data build-lmdb` again to resume)"
                if self.path.name.endswith(".partial")
                else ""
            )
            raise DataError(f"{self.path} has no {MANIFEST}: not a complete mcf LMDB{hint}")
        if manifest.get("format") != FORMAT:
            raise DataError(f"{self.path / MANIFEST} is not an {FORMAT} manifest")
        self.manifest = manifest
        self.count = int(manifest["count"])
        splits = manifest.get("splits") or {}
        if split is None or (split == "train" and split not in splits):
            self.start, self.stop = 0, self.count
        elif split in splits:
            self.start, self.stop = (int(v) for v in splits[split])
        else:
            raise DataError(f"{self.path} has no '{split}' split (it has: {', '.join(splits) or 'none'})")
        if not 0 <= self.start <= self.stop <= self.count:
            raise DataError(f"{self.path}: split '{split}' range {self.start}..{self.stop} outside 0..{self.count}")
        self._db = _LazyLMDB(self.path, subdir=True)
        self._check()
        if self.stop == self.start:
            raise DataError(f"{self.path} is empty" + (f" (split '{split}')" if split else ""))

    def _check(self) -> None:
        import lmdb

        try:
            with self._db.txn() as txn:
                length = txn.get(LENGTH_KEY)
                last_ok = not self.count or txn.get(image_key(self.count - 1)) is not None
                extra = txn.get(image_key(self.count)) is not None
        except lmdb.Error as e:
            raise DataError(f"cannot read LMDB {self.path}: {e}") from None
        if length is None or int(length) != self.count:
            raise DataError(f"{self.path}: manifest count {self.count} != stored length {length!r}")
        if not last_ok or extra:
            raise DataError(f"{self.path}: stored images do not match the manifest count {self.count}")

    def __len__(self) -> int:
        return self.stop - self.start

    def read_bytes(self, i: int) -> bytes:
        j = self.start + self._check_index(i)
        v = _lmdb_get(self._db, image_key(j), max_file_bytes(self.max_pixels))
        if v is None:
            raise DataError(f"{self.path}: missing key {image_key(j).decode()}")
        return v

    def name(self, i: int) -> str:
        j = self.start + i
        try:
            v = _lmdb_get(self._db, name_key(j))
        except BadImage:
            v = None
        return f"{self.path}[{j}]" + (f" ({v.decode()})" if v else "")

    @property
    def provenance(self) -> list[dict[str, Any]]:
        return list(self.manifest.get("provenance") or [])


class PaperLMDBDataset(EncodedImageDataset):
    """The paper's layout, read as is: ``db`` (LMDB dir or file) + ``keys_file`` (one key a line).

    The keys are a packed, memory-mapped index of the key file (:func:`~mcf.data.core.index.open_key_list`):
    17 bytes a sample for 13-character keys instead of ~72 for a list of ``str``. The key count must
    equal the ``length`` value stored in the LMDB, and the first and last keys must exist, or a
    :class:`~mcf.errors.DataError` is raised at open.
    """

    def __init__(
        self,
        db: str | os.PathLike,
        keys_file: str | os.PathLike,
        *,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        index: IndexOptions | None = None,
    ):
        import lmdb

        self.path = Path(db)
        self.max_pixels = max_pixels
        if not self.path.exists():
            raise DataError(f"LMDB not found: {self.path}")
        kf = Path(keys_file)
        if not kf.is_file():
            raise DataError(f"LMDB key list not found: {kf}")
        self.keys = open_key_list(kf, index)
        if not len(self.keys):
            raise DataError(f"LMDB key list {kf} is empty")
        self._db = _LazyLMDB(self.path, subdir=self.path.is_dir())
        try:
            with self._db.txn() as txn:
                length = txn.get(LENGTH_KEY)
                missing = [k for k in (self.keys.get(0), self.keys.get(len(self.keys) - 1)) if txn.get(k) is None]
        except lmdb.Error as e:
            raise DataError(f"cannot read LMDB {self.path}: {e}") from None
        if length is None:
            raise DataError(f"{self.path} has no 'length' key: not the paper's LMDB layout")
        if int(length) != len(self.keys):
            raise DataError(f"{self.path}: 'length' is {int(length)} but {kf} lists {len(self.keys)} keys")
        if missing:
            raise DataError(
                f"{self.path}: keys listed in {kf} are missing from the LMDB, e.g. "
                f"{missing[0].decode(errors='replace')!r}"
            )

    def __len__(self) -> int:
        return len(self.keys)

    def read_bytes(self, i: int) -> bytes:
        v = _lmdb_get(self._db, self.keys.get(self._check_index(i)), max_file_bytes(self.max_pixels))
        return v if v is not None else b""  # a missing value is an (empty) bad sample

    def name(self, i: int) -> str:
        return f"{self.path}[{self.keys[i]}]"
