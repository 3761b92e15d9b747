"""Tiny webdataset shards for the tests (32-56 px images, a few dozen samples), written with tarfile."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from data_helpers import corrupt_png, encode, random_image


def add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tf.addfile(ti, io.BytesIO(data))


def make_shards(
    root: Path, sizes: tuple[int, ...] = (10, 11, 12), seed: int = 0, bad: dict[int, str] | None = None
) -> list[bytes]:
    """Shards ``root/00000.tar ...`` holding ``sizes[k]`` image samples each (JPEG and PNG alternating,
    each with a ``.json`` member). ``bad`` maps a global sample number to a kind of bad image member
    (``"corrupt"``: a PNG failing its CRC, ``"truncated"``: half a JPEG, ``"empty"``). Returns the
    image bytes of every sample in shard order."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, k = [], 0
    for s, n in enumerate(sizes):
        with tarfile.open(root / f"{s:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
            for _ in range(n):
                a = random_image(rng, 32 + (k * 7) % 25, 32 + (k * 11) % 25)
                ext, data = ("jpg", encode(a, "JPEG", quality=90)) if k % 2 else ("png", encode(a, "PNG"))
                kind = (bad or {}).get(k)
                if kind == "corrupt":
                    ext, data = "png", corrupt_png(a)
                elif kind == "truncated":
                    data = encode(a, "JPEG", quality=90)[:300]
                    ext = "jpg"
                elif kind == "empty":
                    data = b""
                add_member(tf, f"s{k:05d}.{ext}", data)
                add_member(tf, f"s{k:05d}.json", json.dumps({"k": k}).encode())
                images.append(data)
                k += 1
    return images
