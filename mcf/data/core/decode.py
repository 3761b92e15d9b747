"""Robust image decoding shared by every loader: bytes -> RGB, or a :class:`BadImage` with a reason.

Both loaders apply the same policy, so a file is "bad" in both or in neither:

* unreadable (any ``OSError``: missing, a dangling link, permission, I/O error, a directory), not a
  regular file (a FIFO, a device: reading one could block or never end), larger than
  :func:`max_file_bytes` -> bad; see :func:`read_file`;
* empty, not an image, truncated (JPEG without its end marker, PNG without ``IEND``), a JPEG whose
  marker structure is broken (libjpeg decodes some with a warning, DALI's parser rejects them), any
  decoder error, or more than ``max_pixels`` pixels -> bad (skipped, substituted and counted);
* grey, palette, alpha, CMYK, 16-bit and float images -> converted to 8-bit RGB.

This module imports only numpy and PIL: DALI's spawned source workers import it.
"""

from __future__ import annotations

import io
import os
import stat
import warnings

import numpy as np
from PIL import Image

# Our ``max_pixels`` guard is applied from the header, before any pixel is decoded. PIL's own
# process-wide decompression-bomb limit (warn at ~89 MP, raise at twice that) is left as it is;
# the default here is below it. A truncated file is a bad sample, never a half-grey image: the
# end-marker check below catches it whatever ``ImageFile.LOAD_TRUNCATED_IMAGES`` says.
DEFAULT_MAX_PIXELS = 64_000_000
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".ppm", ".pgm", ".tif", ".tiff")

# Formats/modes that DALI's decoder reads to the same pixels as PIL (CPU decode is bit-identical
# to PIL for JPEG); anything else is re-encoded losslessly to PNG by the source before DALI sees it.
_DALI_PASSTHROUGH = {("JPEG", "RGB"), ("JPEG", "L"), ("PNG", "RGB"), ("PNG", "L")}


class BadImage(Exception):
    """A sample that cannot be decoded; ``str(e)`` is a short reason."""


def max_file_bytes(max_pixels: int) -> int:
    """The largest file read as an image: 8 bytes per allowed pixel (uncompressed 16-bit RGBA)
    plus 64 MiB of metadata. A larger file is bad without being read into memory."""
    return 8 * max_pixels + (64 << 20)


def read_file(path: str | os.PathLike, max_bytes: int) -> bytes:
    """The bytes of the regular file ``path``, or :class:`BadImage` with the reason.

    Any ``OSError`` (missing, dangling or looping link, permission, I/O error, a directory) is a bad
    sample. The type is checked before the file is opened (a FIFO would block the reader forever,
    a device such as /dev/zero would never end) and again after (``O_NONBLOCK``: the path may have
    been replaced in between); reads stop past ``max_bytes`` (procfs-style files report size 0).
    """
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise BadImage("not a regular file")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise BadImage("not a regular file")
            if st.st_size > max_bytes:
                raise BadImage(f"file too large ({st.st_size} > {max_bytes} bytes)")
            chunks, total = [], 0
            while chunk := os.read(fd, min(max(st.st_size - total, 1 << 16), max_bytes + 1 - total)):
                chunks.append(chunk)
                total += len(chunk)
                if total > max_bytes:
                    raise BadImage(f"file too large (> {max_bytes} bytes)")
        finally:
            os.close(fd)
    except OSError as e:
        raise BadImage(f"unreadable ({e.strerror or type(e).__name__})") from None
    return b"".join(chunks)


def _open(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise BadImage("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise BadImage(f"too large ({e})") from None
    except Exception as e:  # UnidentifiedImageError, struct errors on garbage headers, ...
        raise BadImage(f"not an image ({type(e).__name__})") from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise BadImage("zero-sized image")
    if w * h > max_pixels:
        raise BadImage(f"too large ({w}x{h} > {max_pixels} pixels)")
    return img


def _structurally_complete(data: bytes, fmt: str | None) -> bool:
    """Cheap end-of-stream check: a truncated JPEG/PNG lacks its final marker."""
    tail = data[-64:].rstrip(b"\x00")
    if fmt == "JPEG":
        return tail.endswith(b"\xff\xd9")
    if fmt == "PNG":
        return b"IEND" in tail
    return True


# JPEG markers without a length field, and the bytes that may follow 0xFF in entropy-coded data
# (after the first SOS): stuffing 0x00, fill 0xFF, RSTn, EOI, and the segments a progressive or
# multi-scan file puts between scans (DHT, DAC, SOS, DQT, DNL, DRI, DHP, EXP, APPn, COM, TEM).
_JPEG_NO_LENGTH = frozenset({0x01, *range(0xD0, 0xD8)})
_JPEG_IN_SCAN = np.zeros(256, dtype=bool)
_JPEG_IN_SCAN[[0x00, 0xFF, *range(0xD0, 0xD8), 0xD9, 0xC4, 0xCC, *range(0xDA, 0xF0), 0xFE, 0x01]] = True
# Frame types (SOFn marker), sample precision and component counts that DALI's decoders read to
# the same pixels as libjpeg-turbo (PIL): baseline, extended and progressive Huffman, 8-bit, grey
# or YCbCr. Lossless, arithmetic-coded, 12-bit, CMYK or YCCK frames are re-encoded for DALI.
_DALI_JPEG_FRAMES = frozenset({0xC0, 0xC1, 0xC2})


def jpeg_frame(data: bytes) -> tuple[int, int, int]:
    """Walk a JPEG's marker segments: ``(SOF marker, precision, components)``, or :class:`BadImage`.

    The headers must chain from SOI to the first SOS with consistent lengths, and every 0xFF in the
    entropy-coded data must be followed by a byte that may follow it there. libjpeg (PIL) decodes
    files that break this with a "Corrupt JPEG data" warning, while DALI's parser rejects them
    (found by flipping bytes of JPEGs: e.g. a DHT marker overwritten), so they are bad in both loaders.
    """
    n, i, frame = len(data), 2, None
    while True:
        if i + 1 >= n or data[i] != 0xFF:
            raise BadImage(f"corrupt JPEG (no marker at byte {i})")
        m = data[i + 1]
        if m == 0xFF:  # fill byte
            i += 1
            continue
        if m in _JPEG_NO_LENGTH:
            i += 2
            continue
        if m in (0x00, 0xD8, 0xD9) or i + 4 > n:
            raise BadImage(f"corrupt JPEG (marker 0x{m:02X} at byte {i})")
        length = data[i + 2] << 8 | data[i + 3]
        if length < 2 or i + 2 + length > n:
            raise BadImage(f"corrupt JPEG (segment length {length} at byte {i})")
        if 0xC0 <= m <= 0xCF and m not in (0xC4, 0xC8, 0xCC):
            if length < 8:
                raise BadImage("corrupt JPEG (short frame header)")
            frame = (m, data[i + 4], data[i + 9])
        i += 2 + length
        if m == 0xDA:
            break
    if frame is None:
        raise BadImage("corrupt JPEG (scan before frame header)")
    scan = np.frombuffer(data, dtype=np.uint8, offset=i)
    after_ff = scan[np.flatnonzero(scan[:-1] == 0xFF) + 1]
    bad = after_ff[~_JPEG_IN_SCAN[after_ff]]
    if bad.size:
        raise BadImage(f"corrupt JPEG (marker 0x{int(bad[0]):02X} in the entropy-coded data)")
    return frame


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB (16-bit and float are rescaled, not clipped)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(img, dtype=np.int64)
        hi = 65535 if mode.startswith("I;16") or a.max(initial=0) > 255 else 255
        a = np.clip(a, 0, hi) * 255 // hi
        return Image.fromarray(a.astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        a = np.asarray(img, dtype=np.float32)
        scale = 255.0 if a.max(initial=0.0) <= 1.0 else 1.0
        return Image.fromarray(np.clip(a * scale, 0, 255).round().astype(np.uint8), "L").convert("RGB")
    if mode in ("P", "PA") and "transparency" in img.info or mode == "PA":
        img = img.convert("RGBA")
    return img.convert("RGB")


def decode_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode encoded image bytes to an RGB PIL image, or raise :class:`BadImage`."""
    img = _open(data, max_pixels)
    if not _structurally_complete(data, img.format):
        raise BadImage(f"truncated {img.format}")
    if img.format == "JPEG":
        jpeg_frame(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
            return to_rgb(img)
    except BadImage:
        raise
    except Exception as e:
        raise BadImage(f"corrupt {img.format} ({e})") from None


def prepare_for_dali(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[bytes, int, int]:
    """Validate bytes for DALI's decoder without decoding common files: ``(bytes, height, width)``.

    JPEG/PNG in RGB or grey pass through after a header parse and an end-marker check (a JPEG
    also has its marker structure walked and must be 8-bit baseline/extended/progressive Huffman;
    a PNG has its chunk CRCs checked by ``verify``); every other format or mode (CMYK, 16-bit,
    WebP, palette, alpha, lossless or arithmetic JPEG, ...) is decoded by PIL and re-encoded as
    lossless PNG, so DALI decodes exactly the pixels the PyTorch loader sees. A file DALI's decoder
    still rejects at run time is handled by the loader (see :mod:`mcf.data.loaders.dali_loader`).
    Raises :class:`BadImage` like :func:`decode_rgb`.
    """
    img = _open(data, max_pixels)
    fmt, mode = img.format, img.mode
    w, h = img.size
    # IHDR bit depth sits at byte 24; a 16-bit RGB PNG opens in PIL as plain "RGB".
    bits16 = fmt == "PNG" and len(data) > 24 and data[24] != 8
    if (fmt, mode) in _DALI_PASSTHROUGH and not bits16:
        if not _structurally_complete(data, fmt):
            raise BadImage(f"truncated {fmt}")
        if fmt == "JPEG":
            sof, precision, components = jpeg_frame(data)
            if sof not in _DALI_JPEG_FRAMES or precision != 8 or components not in (1, 3):
                return _reencode(data, max_pixels), h, w
        if fmt == "PNG":
            try:
                img.verify()
            except Exception as e:
                raise BadImage(f"corrupt PNG ({e})") from None
        return data, h, w
    return _reencode(data, max_pixels), h, w


def _reencode(data: bytes, max_pixels: int) -> bytes:
    """PIL's RGB pixels of ``data`` as a fast lossless PNG (raises :class:`BadImage`)."""
    buf = io.BytesIO()
    decode_rgb(data, max_pixels).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
