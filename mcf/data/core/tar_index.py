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
import stat
from collections.abc import Callable, Iterable, Iterator
from typing import BinaryIO, TypeVar

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_KEY_EXT = re.compile(r"^((?:.*/|)[^./][^.]*)\.([^/]*)$", re.DOTALL)
BLOCK = 512
_REGULAR = (b"0", b"\0", b"7")
MAX_META_BYTES = 1 << 20  # a pax header or GNU long name read into memory (real ones are < 1 KiB)
T = TypeVar("T")


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
    """The records ``"LEN key=value\\n"`` of a pax header. ``LEN`` counts the whole record; a length that
    does not reach past its own digits, runs past the header or does not end on a newline raises
    ``ValueError`` (a record of length 0 would never advance)."""
    out, pos = {}, 0
    while pos < len(data):
        if data[pos] == 0:
            break  # NUL padding after the last record
        sp = data.find(b" ", pos, pos + 24)
        digits = data[pos:sp]
        if sp < 0 or not digits.isdigit():
            raise ValueError(f"pax record at {pos} has no length")
        n = int(digits)
        if n <= sp + 1 - pos or pos + n > len(data) or data[pos + n - 1 : pos + n] != b"\n":
            raise ValueError(f"pax record at {pos} has a bad length {n}")
        key, _, value = data[sp + 1 : pos + n - 1].partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        pos += n
    return out


def scan_members(fd: int, size: int) -> Iterator[tuple[str, int, int]]:
    """``(name, data offset, data size)`` of every regular member of the tar file open as ``fd``
    (``size`` bytes), reading only the headers (``pread``). Raises :class:`TarDamage` where a header
    is invalid or a member runs past the end of the file."""
    return _members(lambda pos, n: os.pread(fd, n, pos), size)


def _members(read: Callable[[int, int], bytes], size: int | None) -> Iterator[tuple[str, int, int]]:
    """:func:`scan_members` over ``read(offset, n)`` (fewer bytes at the end of the data); ``size``
    None: a stream of unknown length (reads then come at increasing offsets only)."""
    pos, long_name, pax = 0, None, {}
    while size is None or pos + BLOCK <= size:
        h = read(pos, BLOCK)
        if not h and pos == 0 and size is None:
            raise TarDamage("the stream is empty (a failed command, a missing object?)")
        if not h.strip(b"\0"):
            return  # end-of-archive blocks (or data cut exactly at a member boundary)
        if len(h) < BLOCK:
            if size is None:
                raise TarDamage(f"the stream ends inside the header at byte {pos}")
            return
        try:
            ok = _checksum_ok(h)
        except TarDamage:
            ok = False
        if not ok:
            raise TarDamage(f"bad header checksum at byte {pos}")
        typ = h[156:157]
        pax_size = pax.get("size")
        if pax_size is None:
            n = _octal(h[124:136])
        elif pax_size.isascii() and pax_size.isdigit():  # no sign, no blanks
            n = int(pax_size)
        else:
            raise TarDamage(f"bad pax size {pax_size[:40]!r} at byte {pos}")
        if n < 0:  # a base-256 or pax length below zero would step back onto this header: never loop
            raise TarDamage(f"negative member size {n} at byte {pos}")
        data = pos + BLOCK
        if size is not None and data + n > size:
            raise TarDamage(f"member at byte {pos} runs past the end of the file ({size} bytes): truncated")
        if typ in (b"L", b"x"):  # read into memory: bounded
            if n > MAX_META_BYTES:
                what = "GNU long name" if typ == b"L" else "pax header"
                raise TarDamage(f"{what} of {n} bytes at byte {pos} (more than {MAX_META_BYTES})")
            body = read(data, n)
            if len(body) < n:
                raise TarDamage(f"the data ends inside the member at byte {pos}: truncated")
        if typ == b"L":  # GNU long name: the next member's name
            long_name = body.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        elif typ == b"x":  # pax extended header of the next member
            try:
                pax = _pax(body)
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


class _Forward:
    """``read(offset, n)`` over a stream that cannot seek: offsets must not decrease; the bytes
    between are read and dropped in 1 MiB pieces (a skipped member is never held whole)."""

    def __init__(self, f: BinaryIO):
        self.f, self.pos = f, 0

    def read(self, pos: int, n: int) -> bytes:
        if pos < self.pos:
            raise TarDamage(f"byte {pos} lies behind the stream position {self.pos}")
        while self.pos < pos:
            chunk = self.f.read(min(pos - self.pos, 1 << 20))
            if not chunk:
                raise TarDamage(f"the stream ends at byte {self.pos}, inside a member: truncated")
            self.pos += len(chunk)
        out = bytearray()
        while len(out) < n:
            chunk = self.f.read(n - len(out))
            if not chunk:
                break
            out += chunk
        self.pos += len(out)
        return bytes(out)


def _samples(members: Iterable[tuple[str, int, int]], pick: Callable[[str, int, int], T]) -> Iterator[T]:
    """``pick(name, offset, size)`` of each sample's first image member, in archive order (members grouped
    into samples by their key, :func:`split_name`). Where the members break off (:class:`TarDamage`), the
    sample whose image member was picked is yielded before the damage is raised: the damage lies in a
    later member."""
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
                found = pick(name, off, n)
    except TarDamage:
        if found is not None:
            yield found
        raise
    if found is not None:
        yield found


def image_samples(members: Iterator[tuple[str, int, int]]) -> Iterator[tuple[int, int]]:
    """``(data offset, size)`` of each image sample's image member, in archive order."""
    return _samples(members, lambda name, off, n: (off, n))


def index_tar(path: str) -> tuple[list[tuple[int, int]], str | None]:
    """``([(offset, size), ...], damage)`` of a local shard's image samples; ``damage`` says why the
    archive could not be read to its end (the samples before that point are kept), else None."""
    out: list[tuple[int, int]] = []
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO would block open() forever
    except OSError as e:
        return out, f"unreadable ({e.strerror or e})"
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return out, "not a regular file"
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
    seeking (the headers validated as :func:`scan_members` does). Raises :class:`TarDamage` where the
    stream breaks off (an ``OSError`` of the stream, a stalled ``pipe:`` included, is damage too).
    An image member larger than ``max_bytes`` is not read into memory: its sample yields ``b""``
    (a bad sample for the decoder)."""
    src = _Forward(f)

    def read(pos: int, n: int) -> bytes:
        try:
            return src.read(pos, n)
        except OSError as e:
            raise TarDamage(f"{type(e).__name__}: {e}") from None

    def pick(name: str, off: int, n: int) -> bytes:
        if max_bytes is not None and n > max_bytes:
            return b""  # skipped by the stream without being held
        data = read(off, n)
        if len(data) != n:
            raise TarDamage(f"member {name[:200]} is cut short ({len(data)} of {n} bytes)")
        return data

    return _samples(_members(read, None), pick)


def count_stream(f: BinaryIO) -> tuple[int, str | None]:
    """``(image samples, damage)`` of a tar stream (for indexes of remote shards). No member is held
    in memory: every image member is skipped by the stream, whatever its size."""
    n = 0
    try:
        for _ in stream_samples(f, max_bytes=0):
            n += 1
    except TarDamage as e:
        return n, str(e)
    return n, None
