"""Check an LMDB file against LMDB's own metadata before mapping it.

LMDB maps the whole file; a page past the end of a file cut short (an interrupted copy) is a SIGBUS
that kills the process, not an error. Its first two pages are meta pages (LMDB 0.9, 64-bit
little-endian layout, as ``lmdb.h`` / ``mdb.c`` define them):

=======  ====  =========================================================================
offset   size  field
=======  ====  =========================================================================
0        8     page number (0 or 1)
10       2     page flags (``P_META`` = 0x08)
16       4     ``mm_magic`` = 0xBEEFC0DE
20       4     ``mm_version`` = 1
32       8     ``mm_mapsize``
40       48    ``mm_dbs[0]`` (free-page DB); its first 4 bytes (``md_pad``) hold the page size
88       48    ``mm_dbs[1]`` (main DB); ``md_root`` (last 8 bytes) is its root page
136      8     ``mm_last_pg``: the last page in use
144      8     ``mm_txnid``
=======  ====  =========================================================================

The meta with the larger transaction id is the current one; its pages ``0 .. mm_last_pg`` must lie
inside the file. Anything else (empty, garbage, cut short) raises a one-line :class:`DataError`.
"""

from __future__ import annotations

import struct
from pathlib import Path

from mcf.errors import DataError

MAGIC = 0xBEEFC0DE
VERSION = 1
P_META = 0x08
P_INVALID = 2**64 - 1
_META = struct.Struct("<QHH4xIIQQ")  # pgno, pad, flags, (lower/upper), magic, version, address, mapsize


def _meta(page: bytes) -> dict | None:
    if len(page) < 152:
        return None
    pgno, _, flags, magic, version, _, mapsize = _META.unpack_from(page, 0)
    if magic != MAGIC or version != VERSION or not flags & P_META:
        return None
    psize = struct.unpack_from("<I", page, 40)[0]
    main_root = struct.unpack_from("<Q", page, 88 + 40)[0]
    free_root = struct.unpack_from("<Q", page, 40 + 40)[0]
    last_pg, txnid = struct.unpack_from("<QQ", page, 136)
    return {
        "pgno": pgno,
        "psize": psize,
        "mapsize": mapsize,
        "roots": (free_root, main_root),
        "last_pg": last_pg,
        "txnid": txnid,
    }


def check_lmdb_file(path: str | Path, subdir: bool) -> None:
    """Raise :class:`DataError` unless ``path`` (a directory with ``data.mdb`` when ``subdir``, else
    the file itself) is an LMDB whose current meta page's pages all lie inside the file."""
    data = Path(path) / "data.mdb" if subdir else Path(path)
    try:
        size = data.stat().st_size
        with open(data, "rb") as f:
            head = f.read(152)
            first = _meta(head)
            if first is None:
                raise DataError(
                    f"{data} is not an LMDB ({'empty file' if size == 0 else 'no valid meta page'}): "
                    "a damaged or unfinished copy? copy or rebuild it"
                )
            psize = first["psize"]
            if psize < 512 or psize & (psize - 1) or size < 2 * psize:
                raise DataError(
                    f"{data} is damaged: {size} bytes, not even its two meta pages (page size {psize}); copy it again"
                )
            f.seek(psize)
            second = _meta(f.read(152))
    except OSError as e:
        raise DataError(f"cannot read LMDB {data}: {e.strerror or e}") from None
    metas = [m for m in (first, second) if m is not None]
    current = max(metas, key=lambda m: m["txnid"])
    need = (current["last_pg"] + 1) * psize
    if need > size:
        raise DataError(
            f"{data} is cut short: {size} bytes, but its metadata uses {need} ({current['last_pg'] + 1} pages of "
            f"{psize}); an interrupted copy? copy it again"
        )
    if any(r != P_INVALID and r > current["last_pg"] for r in current["roots"]):
        raise DataError(f"{data} is damaged: a root page lies past its last page; copy or rebuild it")
