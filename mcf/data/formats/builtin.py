"""The built-in real faces: photographs shipped inside the scikit-image wheel, no download.

* ``skimage/data/lfw_subset.npy``: the first 100 of its 200 25x25 grey crops are faces from
  Labeled Faces in the Wild (the other 100 are background and are not used); upsampled to 64 px
  (bicubic) and stored as grey PNG.
* ``astronaut.png`` (public domain) and ``camera.png`` (CC0), stored as they are.

Fixed split: train = faces 0..79 + astronaut + camera (82 images), val = faces 80..99 (20).
Stored in our LMDB format (train first, then val) with ``provenance.json`` next to the manifest.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mcf.data.formats.datasets import FORMAT, FORMAT_VERSION, LENGTH_KEY, MANIFEST, LMDBDataset, image_key, name_key
from mcf.errors import DataError
from mcf.fileio import mcf_cache_dir

BUILTIN_VERSION = 1
FACE_SIZE = 64
N_FACES = 100
N_TRAIN_FACES = 80
LFW_LICENCE = "LFW (vis-www.cs.umass.edu/lfw), redistributed in scikit-image's data; research use"


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _items() -> tuple[list[tuple[str, bytes]], dict[str, list[int]], list[dict[str, Any]]]:
    """(name, PNG bytes) in storage order, the splits, and the provenance records."""
    try:
        import skimage
        from skimage import data as skdata
    except ImportError as e:
        raise DataError(f"the built-in faces need scikit-image (pip install scikit-image): {e}") from None
    pkg = f"scikit-image {skimage.__version__}"
    faces = np.asarray(skdata.lfw_subset())[:N_FACES]  # (100, 25, 25)
    if faces.dtype != np.uint8:
        faces = np.clip(faces * (255.0 if faces.max() <= 1.0 else 1.0), 0, 255).round().astype(np.uint8)
    face_png = [_png(Image.fromarray(f, "L").resize((FACE_SIZE, FACE_SIZE), Image.BICUBIC)) for f in faces]
    astronaut = _png(Image.fromarray(np.asarray(skdata.astronaut(), dtype=np.uint8)))
    camera = _png(Image.fromarray(np.asarray(skdata.camera(), dtype=np.uint8)))
    items = [(f"lfw_subset/{i:03d}", face_png[i]) for i in range(N_TRAIN_FACES)]
    items += [("astronaut", astronaut), ("camera", camera)]
    n_train = len(items)
    items += [(f"lfw_subset/{i:03d}", face_png[i]) for i in range(N_TRAIN_FACES, N_FACES)]
    splits = {"train": [0, n_train], "val": [n_train, len(items)]}
    provenance = [
        {
            "package": pkg,
            "file": "skimage/data/lfw_subset.npy",
            "licence": LFW_LICENCE,
            "used": f"faces 0..{N_FACES - 1} of 200, 25x25 -> {FACE_SIZE}x{FACE_SIZE} bicubic",
        },
        {"package": pkg, "file": "skimage/data/astronaut.png", "licence": "public domain (NASA)"},
        {"package": pkg, "file": "skimage/data/camera.png", "licence": "CC0 (Lav Varshney)"},
    ]
    return items, splits, provenance


def build_builtin(out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write the built-in faces LMDB to ``out`` (atomically: a temporary sibling, then rename)."""
    import lmdb

    out = Path(out).expanduser()
    if out.exists():
        if not overwrite:
            raise DataError(f"{out} already exists (pass --overwrite to replace it)")
        shutil.rmtree(out)
    items, splits, provenance = _items()
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    env = lmdb.open(str(tmp), map_size=1 << 30, subdir=True, mode=0o666)  # py-lmdb defaults to 0o755; the umask decides
    with env.begin(write=True) as txn:
        for i, (name, data) in enumerate(items):
            txn.put(image_key(i), data)
            txn.put(name_key(i), name.encode())
        txn.put(LENGTH_KEY, str(len(items)).encode())
    env.sync(True)
    env.close()
    (tmp / "provenance.json").write_text(json.dumps(provenance, indent=1))
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "count": len(items),
        "splits": splits,
        "provenance": provenance,
        "builtin_version": BUILTIN_VERSION,
        "bad": [],
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    try:
        os.rename(tmp, out)
    except OSError:
        # Another process (rank) finished first: keep theirs if it is complete.
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / MANIFEST).is_file():
            raise
    return out


def ensure_builtin() -> Path:
    """The cached built-in LMDB (``mcf_cache_dir()/builtin``), built on first use."""
    path = mcf_cache_dir() / "builtin"
    m = path / MANIFEST
    if m.is_file():
        try:
            if json.loads(m.read_text()).get("builtin_version") == BUILTIN_VERSION:
                return path
        except ValueError:
            pass
        shutil.rmtree(path, ignore_errors=True)
    return build_builtin(path)


def load_builtin_faces(split: str = "train") -> list[Image.Image]:
    """The built-in images of ``split`` ('train', 'val' or 'all') as RGB PIL images."""
    ds = LMDBDataset(ensure_builtin(), split=None if split == "all" else split)
    return [ds[i] for i in range(len(ds))]
