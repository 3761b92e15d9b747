"""Open a data set by path, whatever its format (:func:`open_dataset`), and the cheap checks a run
makes on that path before its heavy start-up (:func:`precheck`). Above every format module, so no
format imports another to dispatch.
"""

from __future__ import annotations

import os
from pathlib import Path

from mcf.data.core.decode import DEFAULT_MAX_PIXELS
from mcf.data.core.index import IndexOptions
from mcf.data.formats.builtin import ensure_builtin
from mcf.data.formats.datasets import MANIFEST, ImageFolderDataset, LMDBDataset, PaperLMDBDataset
from mcf.data.formats.lmdb_check import check_lmdb_file
from mcf.data.formats.shards import is_remote, is_shard_spec, open_shards
from mcf.errors import DataError


def precheck(path: str | os.PathLike, lmdb_keys: str | os.PathLike | None = None) -> None:
    """The cheap checks of ``--data`` a run makes before any heavy start-up: the path exists (remote
    shards and brace patterns are checked when opened), the key list exists, an LMDB file is whole.

    Raises:
        DataError: naming what is missing or damaged.
    """
    s = str(path)
    if s == "builtin" or is_remote(s) or "{" in s:
        return
    p = Path(s).expanduser()
    if not p.exists():
        raise DataError(f"data path not found: {s}")
    if lmdb_keys is not None and not Path(lmdb_keys).is_file():
        raise DataError(f"LMDB key list not found: {lmdb_keys}")
    if (p / "data.mdb").is_file():
        check_lmdb_file(p, subdir=True)
    elif lmdb_keys is not None and p.is_file():
        check_lmdb_file(p, subdir=False)


def open_dataset(
    path: str | os.PathLike,
    lmdb_keys: str | os.PathLike | None = None,
    split: str | None = None,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    index: IndexOptions | None = None,
):
    """Open whatever ``path`` is: ``"builtin"``, our LMDB, the paper's LMDB (with ``lmdb_keys``),
    webdataset shards (a brace pattern, a directory of ``.tar`` files, one ``.tar``, a list file,
    ``pipe:`` or URLs; see :mod:`mcf.data.formats.shards`), or an image folder. ``dataset[i]`` is an RGB PIL
    image, except for remote shards (:class:`~mcf.data.formats.shards.StreamedShards`: streamed only).

    Args:
        index: where file/key/shard indexes are cached and who builds them (default: next to the
            data, this process builds).

    Raises:
        DataError: missing path, empty dataset, unknown or inconsistent layout, a damaged LMDB.
    """
    if str(path) == "builtin":
        return LMDBDataset(ensure_builtin(), split=split or "train", max_pixels=max_pixels)
    if lmdb_keys is None and is_shard_spec(path):
        if split not in (None, "train"):
            raise DataError(f"shards {path} have no '{split}' split")
        return open_shards(path, max_pixels=max_pixels, index=index)
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data path not found: {p}")
    if lmdb_keys is not None:
        return PaperLMDBDataset(p, lmdb_keys, max_pixels=max_pixels, index=index)
    if p.is_dir() and ((p / MANIFEST).is_file() or (p / "data.mdb").is_file()):
        if (p / MANIFEST).is_file() or p.name.endswith(".partial"):
            return LMDBDataset(p, split=split, max_pixels=max_pixels)
        raise DataError(f"{p} is an LMDB without {MANIFEST}: pass --lmdb-keys KEYS.txt for the paper's layout")
    if p.is_file():
        raise DataError(f"{p} is an LMDB file: pass --lmdb-keys KEYS.txt for the paper's layout")
    if split not in (None, "train"):
        raise DataError(f"image folder {p} has no '{split}' split")
    return ImageFolderDataset(p, max_pixels=max_pixels, index=index)
