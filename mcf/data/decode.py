"""Robust image decoding shared by every loader: bytes -> RGB, or a :class:`BadImage` with a reason.

Both loaders apply the same policy, so a file is "bad" in both or in neither:

* empty, not an image, truncated (JPEG without its end marker, PNG without ``IEND``, or any
  decoder error), or more than ``max_pixels`` pixels -> bad (skipped, substituted and counted);
* grey, palette, alpha, CMYK, 16-bit and float images -> converted to 8-bit RGB.

This module imports only numpy and PIL: DALI's spawned source workers import it.
"""

from __future__ import annotations

import io
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

    JPEG/PNG in RGB or grey pass through after a header parse and an end-marker check (PNG also
    has its chunk CRCs checked by ``verify``); every other format or mode (CMYK, 16-bit, WebP,
    palette, alpha, ...) is decoded by PIL and re-encoded as lossless PNG, so DALI decodes exactly
    the pixels the PyTorch loader sees and never meets a file it might reject.
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
        if fmt == "PNG":
            try:
                img.verify()
            except Exception as e:
                raise BadImage(f"corrupt PNG ({e})") from None
        return data, h, w
    rgb = decode_rgb(data, max_pixels)
    buf = io.BytesIO()
    rgb.save(buf, format="PNG", compress_level=1)
    return buf.getvalue(), h, w
