"""webdataset tar shards, member by member: the sample rule, a header-only indexer for local files,
and a streaming reader for any byte stream.

The webdataset rule: a member ``dir/base.ext`` has the key ``dir/base`` (up to the first dot of the
base name) and the extension ``ext`` (the rest); consecutive members with one key form a sample; a
sample is an image sample when one of its extensions (compared in lower case) is in
:data:`IMAGE_EXTS`, and its image is the first such member. Other members (``.json``, ``.txt``,
...), hidden names (base name starting with a dot) and non-regular entries are ignored.

Numpy-free and torch-free: DALI's spawned workers and DataLoader workers import it.
"""

from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Iterator
from typing import BinaryIO

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_KEY_EXT = re.compile(r"^((?:.*/|)[^./][^.]*)\.([^/]*)$", re.DOTALL)
BLOCK = 512
_REGULAR = (b"0", b"\0", b"7")


def split_name(name: str) -> tuple[str, str] | None:
    """``(key, extension)`` of a member name, or None when it has no extension or is hidden."""
    m = _KEY_EXT.match(name)
    return (m.group(1), m.group(2)) if m else None


def image_ext(ext: str) -> bool:
    return ext.lower() in IMAGE_EXTS


class TarDamage(Exception):
    """A tar archive that cannot be read past some point (``str(e)`` says why)."""


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256, for members of 8 GiB and more
        return int.from_bytes(field[1:], "big") | ((field[0] & 0x3F) << (8 * (len(field) - 1)))
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarDamage(f"not a tar header (number field {text[:12]!r})") from None


def _checksum_ok(h: bytes) -> bool:
    """The header checksum (the field itself counted as 8 spaces); some old tars summed signed bytes."""
    stored = _octal(h[148:156])
    if stored == sum(h[:148]) + 256 + sum(h[156:]):
        return True
    return stored == sum(x - 256 if x > 127 else x for x in h[:148] + h[156:]) + 256


def _pax(data: bytes) -> dict[str, str]:
    out, pos = {}, 0
    while pos < len(data):
        sp = data.find(b" ", pos)
        if sp < 0:
            break
        n = int(data[pos:sp])
        key, _, value = data[sp + 1 : pos + n - 1].partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        pos += n
    return out


def scan_members(fd: int, size: int) -> Iterator[tuple[str, int, int]]:
    """``(name, data offset, data size)`` of every regular member of the tar file open as ``fd``
    (``size`` bytes), reading only the headers (``pread``). Raises :class:`TarDamage` where a header
    is invalid or a member runs past the end of the file."""
    pos, long_name, pax = 0, None, {}
    while pos + BLOCK <= size:
        h = os.pread(fd, BLOCK, pos)
        if len(h) < BLOCK or not h.strip(b"\0"):
            return  # end-of-archive blocks (or a file cut exactly at a member boundary)
        try:
            ok = _checksum_ok(h)
        except TarDamage:
            ok = False
        if not ok:
            raise TarDamage(f"bad header checksum at byte {pos}")
        typ = h[156:157]
        n = pax.get("size")
        try:
            n = int(n) if n is not None else _octal(h[124:136])
        except ValueError:
            raise TarDamage(f"bad pax size {n!r} at byte {pos}") from None
        data = pos + BLOCK
        if data + n > size:
            raise TarDamage(f"member at byte {pos} runs past the end of the file ({size} bytes): truncated")
        if typ == b"L":  # GNU long name: the next member's name
            long_name = os.pread(fd, n, data).split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        elif typ == b"x":  # pax extended header of the next member
            try:
                pax = _pax(os.pread(fd, n, data))
            except ValueError:
                raise TarDamage(f"bad pax header at byte {pos}") from None
        elif typ in (b"g", b"K"):  # global pax header, GNU long link name: ignored
            pass
        else:
            if typ in _REGULAR:
                name = long_name or pax.get("path")
                if name is None:
                    name = h[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                    prefix = h[345:500].split(b"\0", 1)[0] if h[257:262] == b"ustar" else b""
                    if prefix:
                        name = prefix.decode("utf-8", "surrogateescape") + "/" + name
                yield name, data, n
            long_name, pax = None, {}
        pos = data + (n + BLOCK - 1) // BLOCK * BLOCK


def image_samples(members: Iterator[tuple[str, int, int]]) -> Iterator[tuple[int, int]]:
    """``(data offset, size)`` of each image sample's image member, in archive order."""
    key, found = None, None
    try:
        for name, off, n in members:
            kx = split_name(name)
            if kx is None:
                continue
            if kx[0] != key:
                if found is not None:
                    yield found
                key, found = kx[0], None
            if found is None and image_ext(kx[1]):
                found = (off, n)
    except TarDamage:
        if found is not None:  # its image member is complete: the damage is in a later member
            yield found
        raise
    if found is not None:
        yield found


def index_tar(path: str) -> tuple[list[tuple[int, int]], str | None]:
    """``([(offset, size), ...], damage)`` of a local shard's image samples; ``damage`` says why the
    archive could not be read to its end (the samples before that point are kept), else None."""
    out: list[tuple[int, int]] = []
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        return out, f"unreadable ({e.strerror or e})"
    try:
        gen = image_samples(scan_members(fd, os.fstat(fd).st_size))
        try:
            for s in gen:
                out.append(s)
        except TarDamage as e:
            return out, str(e)
        except OSError as e:
            return out, f"read error ({e.strerror or e})"
    finally:
        os.close(fd)
    return out, None


def stream_samples(f: BinaryIO, max_bytes: int | None = None) -> Iterator[bytes]:
    """The image bytes of each image sample of a tar stream, in order, reading it once without
    seeking (``tarfile`` streaming mode). Raises :class:`TarDamage` where the stream breaks off.
    An image member larger than ``max_bytes`` is not read into memory: its sample yields ``b""``
    (a bad sample for the decoder)."""
    key, found = None, None
    try:
        tf = tarfile.open(fileobj=f, mode="r|")
        for m in tf:
            if not m.isreg():
                continue
            kx = split_name(m.name)
            if kx is None:
                continue
            if kx[0] != key:
                if found is not None:
                    yield found
                key, found = kx[0], None
            if found is None and image_ext(kx[1]) and max_bytes is not None and m.size > max_bytes:
                found = b""  # skipped by the stream without being held
            elif found is None and image_ext(kx[1]):
                fo = tf.extractfile(m)
                data = fo.read() if fo is not None else b""
                if len(data) != m.size:
                    raise TarDamage(f"member {m.name} is cut short ({len(data)} of {m.size} bytes)")
                found = data
            tf.members = []  # streaming: keep no history
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        if found is not None:
            yield found
        raise TarDamage(f"{type(e).__name__}: {e}") from None
    if found is not None:
        yield found


def count_stream(f: BinaryIO) -> tuple[int, str | None]:
    """``(image samples, damage)`` of a tar stream (for indexes of remote shards)."""
    n = 0
    try:
        for _ in stream_samples(f):
            n += 1
    except TarDamage as e:
        return n, str(e)
    return n, None
