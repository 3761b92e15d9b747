"""Tiny synthetic image folders and LMDBs for the data tests (32-64 px, a few dozen files)."""

from __future__ import annotations

import io
import os
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# Files of the salted folder that no loader can decode (reason in the comment).
BAD_FILES = {
    "bad/corrupt.png",  # a PNG whose image data fails its CRC
    "bad/truncated.jpg",  # the first half of a JPEG
    "bad/empty.jpg",  # 0 bytes
    "bad/notimage.jpg",  # text with an image extension
    "bad/huge.png",  # 3000x3000 > the test's max_image_pixels (4e6)
}
# Odd but valid files: decoded to RGB by both loaders.
ODD_FILES = {
    "odd/cmyk.jpg", "odd/grey.jpg", "odd/grey16.png", "odd/palette_alpha.png", "odd/rgba.png", "odd/image.webp",
}
HUGE_LIMIT = 4_000_000


def random_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth random RGB image (uint8 (h, w, 3)): gradients plus noise, compresses like a photo."""
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(6 * x + rng.random() * 6), np.cos(5 * y + rng.random() * 6), x * y], -1)
    img = (base * 0.5 + 0.5) * 200 + rng.normal(0, 12, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def encode(a: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format=fmt, **kw)
    return buf.getvalue()


def make_folder(root: Path, n: int = 24, seed: int = 0, sub: str = "") -> list[str]:
    """``n`` good images (JPEG and PNG alternating, 32-56 px, varied aspect) under ``root/sub``."""
    rng = np.random.default_rng(seed)
    d = root / sub if sub else root
    d.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        a = random_image(rng, 32 + (i * 7) % 25, 32 + (i * 11) % 25)
        ext, fmt = (".jpg", "JPEG") if i % 2 else (".png", "PNG")
        (d / f"img{i:03d}{ext}").write_bytes(encode(a, fmt, **({"quality": 92} if fmt == "JPEG" else {})))
        names.append(f"img{i:03d}{ext}")
    return names


def corrupt_png(a: np.ndarray) -> bytes:
    data = bytearray(encode(a, "PNG"))
    i = data.index(b"IDAT") + 20
    data[i] ^= 0xFF
    return bytes(data)


def make_salted_folder(root: Path, n_good: int = 40, seed: int = 1) -> None:
    """``n_good`` good images plus each kind of bad (``BAD_FILES``) and odd (``ODD_FILES``) file."""
    make_folder(root, n_good, seed, sub="good")
    rng = np.random.default_rng(seed + 100)
    a = random_image(rng, 40, 48)
    (root / "bad").mkdir()
    (root / "odd").mkdir()
    jpg = encode(a, "JPEG", quality=90)
    (root / "bad/corrupt.png").write_bytes(corrupt_png(a))
    (root / "bad/truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    (root / "bad/empty.jpg").write_bytes(b"")
    (root / "bad/notimage.jpg").write_bytes(b"this is not an image\n" * 20)
    Image.new("RGB", (3000, 3000), (10, 200, 30)).save(root / "bad/huge.png", optimize=False, compress_level=1)
    Image.fromarray(a).convert("CMYK").save(root / "odd/cmyk.jpg", quality=90)
    Image.fromarray(a).convert("L").save(root / "odd/grey.jpg", quality=90)
    g16 = (np.asarray(Image.fromarray(a).convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(g16).save(root / "odd/grey16.png")  # mode I;16
    pal = Image.fromarray(a).convert("P", palette=Image.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    pal.save(root / "odd/palette_alpha.png", transparency=0)
    Image.fromarray(np.dstack([a, np.full(a.shape[:2], 128, np.uint8)]), "RGBA").save(root / "odd/rgba.png")
    Image.fromarray(a).save(root / "odd/image.webp", quality=90)
    (root / "notes.txt").write_text("ignored: not an image extension\n")


def png_with_header(width: int, height: int) -> bytes:
    """A well-formed PNG whose header claims ``width x height`` RGB pixels but holds one row."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    idat = chunk(b"IDAT", zlib.compress(b"\x00" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idat + chunk(b"IEND", b"")


def jpeg_with_broken_marker(a: np.ndarray) -> bytes:
    """A JPEG whose second DHT segment lost its 0xFF: libjpeg (PIL) decodes it with a "Corrupt JPEG
    data" warning, DALI's parser rejects it ("Invalid marker")."""
    data = bytearray(encode(a, "JPEG", quality=90))
    i = data.index(b"\xff\xc4")
    j = data.index(b"\xff\xc4", i + 2)
    data[j] = 0xC2
    return bytes(data)


def _raises_on_read(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            f.read(16)
    except OSError:
        return True
    return False


def make_hostile_folder(root: Path, n_good: int = 40, seed: int = 3) -> set[str]:
    """``n_good`` good images under ``good/`` plus, under ``hostile/``, entries that cannot be read or
    decoded as root can make them: a dangling and a looping symlink, a FIFO, links to /dev/zero, to
    a write-only sysctl (EACCES even for root) and to /proc/self/mem (EIO at offset 0), an empty
    file, a PNG whose header claims 60000x60000 pixels, a JPEG with a broken marker, and a directory
    named like an image. Returns the names (relative to ``root``) that are bad samples where the
    folder scan lists them (it skips what is not a file or a link to one)."""
    make_folder(root, n_good, seed, sub="good")
    h = root / "hostile"
    h.mkdir()
    (h / "dangling.jpg").symlink_to(root / "nowhere.jpg")
    (h / "loop.jpg").symlink_to("loop.jpg")
    os.mkfifo(h / "fifo.jpg")
    (h / "device.jpg").symlink_to("/dev/zero")
    (h / "empty.jpg").write_bytes(b"")
    (h / "huge_header.png").write_bytes(png_with_header(60000, 60000))
    (h / "broken_marker.jpg").write_bytes(jpeg_with_broken_marker(random_image(np.random.default_rng(seed), 48, 40)))
    (h / "dir.jpg").mkdir()  # a directory is walked, not read
    bad = {"dangling.jpg", "loop.jpg", "fifo.jpg", "device.jpg", "empty.jpg", "huge_header.png", "broken_marker.jpg"}
    if _raises_on_read("/proc/sys/vm/drop_caches"):
        (h / "eacces.jpg").symlink_to("/proc/sys/vm/drop_caches")
        bad.add("eacces.jpg")
    if _raises_on_read("/proc/self/mem"):
        (h / "eio.jpg").symlink_to("/proc/self/mem")
        bad.add("eio.jpg")
    return {f"hostile/{b}" for b in bad}


def make_paper_lmdb(db: Path, keys_file: Path, n: int = 16, seed: int = 2, length: int | None = None) -> list[str]:
    """The paper's layout: values are encoded images under path-like keys, ``length`` holds the count."""
    import lmdb

    rng = np.random.default_rng(seed)
    keys = [f"person{i % 4}/face_{i:04d}.jpg" for i in range(n)]
    env = lmdb.open(str(db), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for k in keys:
            txn.put(k.encode(), encode(random_image(rng, 40, 40), "JPEG", quality=90))
        txn.put(b"length", str(n if length is None else length).encode())
    env.close()
    keys_file.write_text("".join(k + "\n" for k in keys))
    return keys


__all__ = ["BAD_FILES", "ODD_FILES", "HUGE_LIMIT", "make_folder", "make_hostile_folder", "make_salted_folder",
           "make_paper_lmdb", "png_with_header", "jpeg_with_broken_marker"]
