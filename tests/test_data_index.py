"""Compact shared indexes (key lists, folder file lists), the symlink-safe folder scan (issue 12.5),
rank 0 builds / the others wait, worker memory over an epoch, and damaged LMDBs (issue 12.6)."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from data_helpers import make_folder, make_paper_lmdb

from mcf.data import build_lmdb, open_dataset
from mcf.data.core.index import IndexOptions, PackedStrings, open_key_list, open_or_build, pack_lines
from mcf.data.formats import scan as scan_mod
from mcf.data.formats.datasets import ImageFolderDataset, PaperLMDBDataset
from mcf.data.formats.scan import walk_images
from mcf.errors import DataError

OLD = time.time() - 3600


def _age(root: Path) -> None:
    """Give every directory under ``root`` an mtime an hour old (outside the "too recent" window)."""
    for d, _, _ in os.walk(root):
        os.utime(d, (OLD, OLD))


def test_pack_lines_matches_str_strip():
    text = "  a\r\n\nbb \n\t ccc\r\nd\u00e9j\u00e0\n\n\nlast"
    for data in (text, text + "\n", "", "\n", "x", "x\n", "a\nb\nc\n"):
        p = pack_lines(data.encode())
        want = [line.strip() for line in data.splitlines() if line.strip()]
        assert [p[i] for i in range(len(p))] == want, data
    keys = [b"k%012d" % i for i in range(1000)]
    p = pack_lines(b"\n".join(keys) + b"\n")
    assert p.offsets.dtype == np.uint32 and p.nbytes / len(p) == pytest.approx(
        17, abs=0.01
    )  # 13 bytes + a uint32 offset
    assert [p.get(i) for i in (0, 500, 999)] == [keys[0], keys[500], keys[999]]


def test_key_list_is_cached_shared_and_rebuilt_when_changed(tmp_path):
    keys = make_paper_lmdb(tmp_path / "p", tmp_path / "keys.txt", n=10)
    os.utime(tmp_path / "keys.txt", (OLD, OLD))
    ds = PaperLMDBDataset(tmp_path / "p", tmp_path / "keys.txt")
    assert [ds.keys[i] for i in range(10)] == keys
    cache = tmp_path / ".mcf" / "keys-keys.txt.mcfidx"
    assert cache.is_file()
    # pickled (as into DALI's spawned workers) as the index file's path, not its data
    blob = pickle.dumps(ds)
    assert b"face_0003" not in blob
    again = pickle.loads(blob)
    assert again.read_bytes(3) == ds.read_bytes(3) and again.keys._source[0].path == cache
    # a re-open maps the cache; a changed key file is re-read
    stamp = cache.stat().st_mtime_ns
    PaperLMDBDataset(tmp_path / "p", tmp_path / "keys.txt")
    assert cache.stat().st_mtime_ns == stamp
    (tmp_path / "keys.txt").write_text("\n".join(reversed(keys)) + "\n")
    assert PaperLMDBDataset(tmp_path / "p", tmp_path / "keys.txt").keys[0] == keys[-1]
    # read-only data: the cache goes to data.index_cache instead
    ds = PaperLMDBDataset(tmp_path / "p", tmp_path / "keys.txt", index=IndexOptions(cache_dir=str(tmp_path / "cache")))
    assert len(list((tmp_path / "cache").glob("keys-keys.txt-*.mcfidx"))) == 1 and len(ds) == 10


def _tree(root: Path) -> None:
    """a/, b/c/, z/ (2 images each), top.png, and links: a self-link, a loop up, a second link to z,
    a link to a folder outside, twice."""
    for sub in ("a", "b/c", "z"):
        make_folder(root, 2, sub=sub)
    make_folder(root / "top", 1)
    (root / "top" / "img000.png").rename(root / "top.png")
    (root / "top").rmdir()
    os.symlink(".", root / "self")
    os.symlink("..", root / "a" / "up")
    os.symlink("../z", root / "b" / "zz")
    os.symlink(root / "z", root / "a_link_to_z")
    outside = root.parent / "outside"
    make_folder(outside, 2)
    os.symlink(outside, root / "out1")
    os.symlink(outside, root / "out2")
    os.symlink("missing.jpg", root / "dangling.jpg")


def test_symlinks_each_directory_once(tmp_path):
    """Issue 12.5: a loop ends, a self-link adds nothing, a folder behind two links is listed once
    (real paths first, then links in sorted order), a dangling link is kept (a bad sample)."""
    root = tmp_path / "data"
    _tree(root)
    files, dirs = walk_images(root)
    assert files == sorted(
        [
            "a/img000.png",
            "a/img001.jpg",
            "b/c/img000.png",
            "b/c/img001.jpg",
            "z/img000.png",
            "z/img001.jpg",
            "top.png",
            "out1/img000.png",
            "out1/img001.jpg",
            "dangling.jpg",
        ]
    )
    assert [d[0] for d in dirs] == ["", "a", "b", "b/c", "z", "out1"]
    m = build_lmdb(root, tmp_path / "db", workers=0, progress=False)  # the converter's scan is the same one
    assert m["count"] == 9 and [b[0] for b in m["bad"]] == ["dangling.jpg"]
    # the same, through the loader's path, under a timeout (the old scan never returned)
    code = f"from mcf.data import open_dataset; print(len(open_dataset({str(root)!r})))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.stdout.strip() == "10", p.stderr


def test_folder_index_cached_fresh_and_rebuilt(tmp_path, monkeypatch):
    root = tmp_path / "f"
    make_folder(root, 6, sub="x")
    make_folder(root, 4, sub="y/z")
    _age(root)
    ds = ImageFolderDataset(root)
    assert len(ds) == 10 and (root / ".mcf" / "folder.mcfidx").is_file()
    assert ds.name(0).endswith("x/img000.png") and ds.read_bytes(9) == (root / "y/z/img003.jpg").read_bytes()
    assert ds.index.nbytes / len(ds) < 40  # base names + offsets + directory ids (+ a few directories)
    _age(root)  # creating .mcf touched the root

    def no_walk(*a, **k):
        raise AssertionError("a fresh index must not walk the tree")

    monkeypatch.setattr(scan_mod, "walk_images", no_walk)
    assert len(ImageFolderDataset(root)) == 10
    monkeypatch.undo()
    (root / "y/z/img000.png").rename(root / "y/z/renamed.png")  # changes y/z's mtime only
    (root / "x/new.jpg").write_bytes((root / "x/img001.jpg").read_bytes())
    again = ImageFolderDataset(root)
    assert len(again) == 11 and any(again.index.relpath(i) == "y/z/renamed.png" for i in range(11))
    # a directory changed "too recently" is listed again at the next open instead of trusted
    assert again.index.idx.arrays["dir_mtime"].min() == scan_mod.UNKNOWN_MTIME
    os.utime(root / "x", (OLD, OLD))  # a change that restored the mtime: the listing still differs
    (root / "x/img000.png").unlink()
    os.utime(root / "x", (OLD, OLD))
    assert len(ImageFolderDataset(root)) == 10


def test_other_ranks_wait_for_rank_0(tmp_path):
    path = tmp_path / "idx" / "x.mcfidx"
    built = []

    def build(who):
        def f():
            built.append(who)
            return {"n": 3}, PackedStrings.from_bytes([b"a", b"bb", b"c"]).arrays("k")

        return f

    result = {}

    def rank1():
        result["idx"] = open_or_build(
            path, build=build(1), fresh=lambda i: True, what="test", options=IndexOptions(rank=1)
        )

    t = threading.Thread(target=rank1)
    t.start()
    time.sleep(0.3)  # rank 1 is polling by now (it must not build: the folder is writable)
    assert t.is_alive() and not built
    open_or_build(path, build=build(0), fresh=lambda i: True, what="test", options=IndexOptions(rank=0, world_size=2))
    t.join(10)
    assert built == [0] and PackedStrings.from_index(result["idx"], "k")[1] == "bb"
    with pytest.raises(DataError, match="rank 0 to write the index"):
        open_or_build(
            tmp_path / "y.mcfidx",
            build=build(1),
            fresh=lambda i: True,
            what="t",
            options=IndexOptions(rank=1, wait_s=0.2),
        )


def _private_growth(read, n: int, conn) -> None:
    import gc

    from mcf.bench.index_scale import memory

    gc.collect()
    m0 = memory()
    for i in range(n):
        read(i)
    conn.send(memory()["private_dirty"] - m0["private_dirty"])


def _forked_growth(read, n: int) -> int:
    ctx = multiprocessing.get_context("fork")
    a, b = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_private_growth, args=(read, n, b))
    p.start()
    got = a.recv()
    p.join()
    return got


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="needs Linux /proc smaps_rollup")
def test_forked_worker_memory_does_not_grow_over_an_epoch(tmp_path):
    """A DataLoader worker (forked) reading every key of 200k: the compact index writes no page;
    a list of str (the previous representation) copies ~60 bytes a key."""
    n = 200_000
    kf = tmp_path / "keys.txt"
    kf.write_bytes(b"".join(b"k%012d\n" % i for i in range(n)))
    os.utime(kf, (OLD, OLD))
    keys = open_key_list(kf)
    as_list = [keys[i] for i in range(n)]
    compact = _forked_growth(lambda i: keys.get(i), n)
    baseline = _forked_growth(lambda i: as_list[i].encode(), n)
    assert baseline > 30 * n, baseline  # the measurement sees copy-on-write growth when there is some
    assert compact < 2 * n, compact  # < 2 bytes a key (allocator noise), against ~60


def _damaged(tmp_path: Path) -> dict[str, Path]:
    make_folder(tmp_path / "f", 30)
    build_lmdb(tmp_path / "f", tmp_path / "good", workers=0, progress=False)
    out = {}
    data = (tmp_path / "good" / "data.mdb").read_bytes()
    for kind, content in (("truncated", data[: len(data) // 2]), ("garbage", os.urandom(20000)), ("zero", b"")):
        d = tmp_path / kind
        d.mkdir()
        for f in ("manifest.json",):
            (d / f).write_bytes((tmp_path / "good" / f).read_bytes())
        (d / "data.mdb").write_bytes(content)
        out[kind] = d
    return out


def test_damaged_lmdb_is_one_line_not_sigbus(tmp_path):
    """Issue 12.6: data.mdb cut short (an interrupted copy), garbage, empty: a DataError naming the
    file at open, never a SIGBUS when pages are touched; the paper layout (an LMDB file) too."""
    for kind, d in _damaged(tmp_path).items():
        with pytest.raises(DataError, match=f"{d}/data.mdb (is cut short|is not an LMDB)"):
            open_dataset(d)
        for cmd in ("verify", "info"):
            p = subprocess.run(
                [sys.executable, "-m", "mcf", "data", cmd, str(d)], capture_output=True, text=True, timeout=120
            )
            assert p.returncode == 2 and p.stderr.count("\n") == 1 and "data.mdb" in p.stderr, (kind, cmd, p.stderr)
    keys = make_paper_lmdb(tmp_path / "paper", tmp_path / "k.txt", n=40)
    assert len(keys) == 40
    data = (tmp_path / "paper" / "data.mdb").read_bytes()
    (tmp_path / "paper.mdb").write_bytes(data[: len(data) * 2 // 3])  # the layout as one file (subdir=False)
    with pytest.raises(DataError, match="cut short"):
        open_dataset(tmp_path / "paper.mdb", lmdb_keys=tmp_path / "k.txt")


def test_damaged_lmdb_pretrain_exits_2(tmp_path):
    d = _damaged(tmp_path)["truncated"]
    from train_helpers import env, pretrain_args

    p = subprocess.run(
        [sys.executable, "-m", "mcf", "pretrain", *pretrain_args(tmp_path / "run", 2, "--data", str(d))],
        capture_output=True,
        text=True,
        timeout=300,
        env=env(),
    )
    assert p.returncode == 2, p.stderr[-3000:]
    assert f"mcf: error: {d}/data.mdb is cut short" in p.stderr and "Traceback" not in p.stderr


def test_rank_0_that_cannot_write_fails_instead_of_leaving_others_waiting(tmp_path, monkeypatch):
    import errno

    from mcf.data.core import index as index_mod

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(index_mod, "write_index", full)
    make_folder(tmp_path / "f", 3)
    with pytest.raises(DataError, match="No space left on device.*data.index_cache"):
        ImageFolderDataset(tmp_path / "f", index=IndexOptions(rank=0, world_size=2))
    assert len(ImageFolderDataset(tmp_path / "f")) == 3  # alone, it falls back to an index in memory
