"""Datasets (folder, our LMDB, the paper's layout), build-lmdb (report, resume, atomic), verify,
info, builtin, and the ``mcf data`` CLI."""

import argparse
import json

import lmdb
import numpy as np
import pytest
from data_helpers import BAD_FILES, HUGE_LIMIT, ODD_FILES, make_folder, make_paper_lmdb, make_salted_folder

from mcf.data import ImageFolderDataset, LMDBDataset, PaperLMDBDataset, build_lmdb, open_dataset, verify_dataset
from mcf.data.cli import add_parser
from mcf.data.tools import lmdb_build
from mcf.errors import DataError


def _cli(argv):
    parser = argparse.ArgumentParser(prog="mcf")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_folder_lmdb_and_paper_layout_agree(tmp_path):
    names = make_folder(tmp_path / "f", 12)
    folder = open_dataset(tmp_path / "f")
    assert isinstance(folder, ImageFolderDataset) and len(folder) == 12
    build_lmdb(tmp_path / "f", tmp_path / "db", workers=0, progress=False)
    db = open_dataset(tmp_path / "db")
    assert isinstance(db, LMDBDataset) and len(db) == 12
    for i in range(12):
        assert db.read_bytes(i) == folder.read_bytes(i)  # original bytes kept
        assert names[i] in db.name(i)
        assert db[i].mode == "RGB" and db[i].size == folder[i].size
    keys = make_paper_lmdb(tmp_path / "paper", tmp_path / "keys.txt", n=10)
    paper = open_dataset(tmp_path / "paper", lmdb_keys=tmp_path / "keys.txt")
    assert isinstance(paper, PaperLMDBDataset) and len(paper) == 10
    assert paper[3].size == (40, 40) and keys[3] in paper.name(3)
    with pytest.raises(IndexError):
        db[12]


def test_oversized_lmdb_value_is_a_bad_sample_never_copied(tmp_path, monkeypatch):
    """Both LMDB layouts: a value over the image-file cap (as for a folder's files and shard members)
    is a bad sample, checked in the map before it is copied; values within it read as before."""
    from mcf.data.core.decode import BadImage
    from mcf.data.formats import datasets

    make_folder(tmp_path / "f", 4)
    build_lmdb(tmp_path / "f", tmp_path / "db", workers=0, progress=False)
    make_paper_lmdb(tmp_path / "paper", tmp_path / "keys.txt", n=4)
    ours, paper = open_dataset(tmp_path / "db"), open_dataset(tmp_path / "paper", lmdb_keys=tmp_path / "keys.txt")
    sizes = [len(ours.read_bytes(i)) for i in range(4)]
    paper_size = len(paper.read_bytes(0))
    cap = sorted(sizes)[1]  # two values fit, two do not
    monkeypatch.setattr(datasets, "max_file_bytes", lambda max_pixels: cap)
    for i, n in enumerate(sizes):
        if n > cap:
            with pytest.raises(BadImage, match="too large"):
                ours.read_bytes(i)
        else:
            assert len(ours.read_bytes(i)) == n
    monkeypatch.setattr(datasets, "max_file_bytes", lambda max_pixels: paper_size - 1)
    with pytest.raises(BadImage, match="too large"):
        paper.read_bytes(0)


def test_paper_layout_length_mismatch_and_missing_keys(tmp_path):
    make_paper_lmdb(tmp_path / "p1", tmp_path / "k1.txt", n=8, length=9)
    with pytest.raises(DataError, match="'length' is 9 but .* 8 keys"):
        PaperLMDBDataset(tmp_path / "p1", tmp_path / "k1.txt")
    make_paper_lmdb(tmp_path / "p2", tmp_path / "k2.txt", n=8)
    (tmp_path / "k2.txt").write_text((tmp_path / "k2.txt").read_text() + "nope/x.jpg\n")
    with pytest.raises(DataError):
        PaperLMDBDataset(tmp_path / "p2", tmp_path / "k2.txt")
    with pytest.raises(DataError, match="--lmdb-keys"):
        open_dataset(tmp_path / "p2")


def test_lmdb_count_checked_at_open(tmp_path):
    make_folder(tmp_path / "f", 6)
    build_lmdb(tmp_path / "f", tmp_path / "db", workers=0, progress=False)
    m = json.loads((tmp_path / "db/manifest.json").read_text())
    m["count"] = 7
    (tmp_path / "db/manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="count 7"):
        LMDBDataset(tmp_path / "db")


def test_missing_and_empty(tmp_path):
    with pytest.raises(DataError, match="nowhere"):
        open_dataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty/readme.txt").write_text("x")
    with pytest.raises(DataError, match="no images"):
        open_dataset(tmp_path / "empty")
    with pytest.raises(DataError, match="no images"):
        build_lmdb(tmp_path / "empty", tmp_path / "out", workers=0, progress=False)


def test_salted_build_reports_and_leaves_out_bad_files(tmp_path):
    make_salted_folder(tmp_path / "s")
    m = build_lmdb(tmp_path / "s", tmp_path / "db", workers=2, chunk_size=16, max_pixels=HUGE_LIMIT, progress=False)
    assert {rel for rel, _ in m["bad"]} == BAD_FILES
    assert m["count"] == 40 + len(ODD_FILES)
    report = (tmp_path / "db" / lmdb_build.BAD_REPORT).read_text().splitlines()
    assert {line.split("\t")[0] for line in report} == BAD_FILES
    ds = LMDBDataset(tmp_path / "db")
    assert all(ds[i].mode == "RGB" for i in range(len(ds)))
    r = verify_dataset(tmp_path / "s", progress=False, max_pixels=HUGE_LIMIT)
    assert r["count"] == 40 + len(ODD_FILES) + len(BAD_FILES)
    assert {n.split("/s/", 1)[1] for n, _ in r["bad"]} == BAD_FILES
    assert verify_dataset(tmp_path / "db", progress=False)["bad"] == []


def test_interrupted_build_never_opens_and_resumes(tmp_path, monkeypatch):
    make_folder(tmp_path / "f", 20)
    out = tmp_path / "db"
    real = lmdb_build._commit_chunk
    calls = []

    def flaky(env, state, results, done):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the user pressed ^C after two committed chunks
        calls.append(done)
        real(env, state, results, done)

    monkeypatch.setattr(lmdb_build, "_commit_chunk", flaky)
    with pytest.raises(KeyboardInterrupt):
        build_lmdb(tmp_path / "f", out, workers=0, chunk_size=6, progress=False)
    assert not out.exists()
    partial = tmp_path / "db.partial"
    with pytest.raises(DataError, match="interrupted build"):
        open_dataset(partial)
    monkeypatch.setattr(lmdb_build, "_commit_chunk", real)
    resumed = []
    real_encode = lmdb_build._encode_file

    def counting_encode(args):
        resumed.append(args[1])
        return real_encode(args)

    monkeypatch.setattr(lmdb_build, "_encode_file", counting_encode)
    m = build_lmdb(tmp_path / "f", out, workers=0, chunk_size=6, progress=False)
    assert m["count"] == 20 and not partial.exists()
    assert len(resumed) == 20 - 12  # only the files after the two committed chunks were re-read
    ds = LMDBDataset(out)
    ref = ImageFolderDataset(tmp_path / "f")
    assert [ds.read_bytes(i) for i in range(20)] == [ref.read_bytes(i) for i in range(20)]
    # Different options cannot resume someone else's partial build.
    make_folder(tmp_path / "g", 4)
    (tmp_path / "h.partial").mkdir()
    build_lmdb_partial = lmdb.open(str(tmp_path / "h.partial"), map_size=1 << 20)
    with build_lmdb_partial.begin(write=True) as txn:
        txn.put(
            lmdb_build.PROGRESS_KEY, json.dumps({"done": 1, "count": 1, "bad": [], "options": {}, "files": ""}).encode()
        )
    build_lmdb_partial.close()
    with pytest.raises(DataError, match="delete it"):
        build_lmdb(tmp_path / "g", tmp_path / "h", workers=0, progress=False)


def test_build_resize_and_quality(tmp_path):
    from PIL import Image

    d = tmp_path / "f"
    d.mkdir()
    Image.fromarray(np.full((80, 120, 3), 90, np.uint8)).save(d / "a.png")
    build_lmdb(d, tmp_path / "db", workers=0, resize_short=40, quality=80, progress=False)
    img = Image.open(__import__("io").BytesIO(LMDBDataset(tmp_path / "db").read_bytes(0)))
    assert img.format == "JPEG" and img.size == (60, 40)
    with pytest.raises(DataError, match="already exists"):
        build_lmdb(d, tmp_path / "db", workers=0, progress=False)


def test_builtin_real_faces(tmp_path, monkeypatch):
    monkeypatch.setenv("MCF_CACHE", str(tmp_path / "cache"))
    from skimage import data as skdata

    from mcf.data import load_builtin_faces

    train, val = load_builtin_faces("train"), load_builtin_faces("val")
    assert len(train) == 82 and len(val) == 20  # 100 LFW faces (80/20) + astronaut + camera
    assert (tmp_path / "cache/builtin/provenance.json").is_file()
    prov = json.loads((tmp_path / "cache/builtin/provenance.json").read_text())
    assert {p["file"].rsplit("/", 1)[1] for p in prov} == {"lfw_subset.npy", "astronaut.png", "camera.png"}
    assert all(p["licence"] for p in prov)
    assert all(im.mode == "RGB" for im in train + val)
    # They are the skimage pictures: face 0 matches the upsampled original, astronaut is exact.
    face0 = np.asarray(skdata.lfw_subset()[0], dtype=np.float64)
    face0 = face0 * 255 if face0.max() <= 1 else face0
    small = np.asarray(train[0].convert("L").resize((25, 25), 2), dtype=np.float64)
    assert np.corrcoef(small.ravel(), face0.ravel())[0, 1] > 0.95
    assert np.array_equal(np.asarray(train[80]), skdata.astronaut())
    assert np.array_equal(np.asarray(train[81])[..., 0], skdata.camera())
    ds = open_dataset("builtin", split="val")
    assert len(ds) == 20 and "lfw_subset/080" in ds.name(0)


def test_cli_commands(tmp_path, capsys):
    make_folder(tmp_path / "f", 6)
    assert (
        _cli(["data", "build-lmdb", str(tmp_path / "f"), str(tmp_path / "db"), "--workers", "0", "--no-progress"]) == 0
    )
    assert _cli(["data", "verify", str(tmp_path / "db"), "--no-progress"]) == 0
    assert _cli(["data", "info", str(tmp_path / "db"), "--json"]) == 0
    out = capsys.readouterr().out
    info = json.loads(out[out.index("{") :])
    assert info["count"] == 6 and info["kind"] == "LMDBDataset"
    assert _cli(["data", "builtin", str(tmp_path / "bi")]) == 0
    assert len(LMDBDataset(tmp_path / "bi")) == 102
    with pytest.raises(DataError, match="not found"):
        _cli(["data", "info", str(tmp_path / "missing")])
    make_salted_folder(tmp_path / "s")
    assert _cli(["data", "verify", str(tmp_path / "s"), "--no-progress"]) == 1  # bad files -> status 1
