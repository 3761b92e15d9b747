"""Missing, unreadable and hostile files are bad samples in both loaders, never a hang, a traceback
or a process left behind (issue 12.4).

Run as root, so permissions cannot make a file unreadable: the unreadable entries are a dangling
and a looping symlink, a FIFO (reading one blocks), a link to /dev/zero (never ends), a link to a
write-only sysctl (EACCES even for root) and to /proc/self/mem (EIO at offset 0); plus files that
change between the scan and the read (deleted, replaced by a directory or a FIFO, emptied).
"""

import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from data_helpers import encode, jpeg_with_broken_marker, make_folder, make_hostile_folder, random_image
from train_helpers import ROOT, env, pretrain_args

from mcf.data import DataConfig, build_pretrain_loader
from mcf.data.core.decode import BadImage, decode_rgb, read_file
from mcf.errors import DataError

dali = pytest.importorskip("nvidia.dali")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """``(root, listed bad entries, samples listed)``: the folder scan itself skips what is not a
    file or a link to one (FIFO, device, link loop); what it lists of the rest must be bad samples."""
    from mcf.data.formats.factory import open_dataset

    root = tmp_path_factory.mktemp("hostile")
    bad = make_hostile_folder(root, n_good=24)
    ds = open_dataset(root)
    listed = {os.path.relpath(ds.name(i), root) for i in range(len(ds))}
    assert len(bad & listed) >= 5 and listed - bad == {f"good/{n}" for n in os.listdir(root / "good")}
    return root, bad & listed, len(ds)


def _loader(path, kind, *, bs, nw=0, **cfg):
    c = DataConfig(path=str(path), loader=kind, num_workers=nw, **cfg)
    return build_pretrain_loader(c, img_size=32, batch_size=bs, rank=0, world_size=1, seed=0, device=CPU)


def _bad_names(loader, root):
    return {os.path.relpath(n, root) for n in loader.bad_examples}


def test_read_file_refuses_what_is_not_a_regular_file(tmp_path):
    os.mkfifo(tmp_path / "fifo.jpg")
    (tmp_path / "big.jpg").write_bytes(b"x" * 1000)
    (tmp_path / "dir.jpg").mkdir()
    for name, reason in [("fifo.jpg", "not a regular"), ("dir.jpg", "not a regular"), ("nowhere.jpg", "unreadable")]:
        with pytest.raises(BadImage, match=reason):
            read_file(tmp_path / name, 1 << 20)  # a FIFO would block a plain open() forever
    with pytest.raises(BadImage, match="not a regular file"):
        read_file("/dev/zero", 1 << 20)  # would never end
    with pytest.raises(BadImage, match="too large"):
        read_file(tmp_path / "big.jpg", 999)
    assert read_file(tmp_path / "big.jpg", 1000) == b"x" * 1000


def test_a_jpeg_with_a_broken_marker_is_bad():
    """libjpeg decodes it with a warning; DALI's parser stops the whole pipeline on it."""
    from PIL import Image

    data = jpeg_with_broken_marker(random_image(np.random.default_rng(0), 40, 48))
    Image.open(io.BytesIO(data)).load()  # PIL alone accepts it
    with pytest.raises(BadImage, match="corrupt JPEG"):
        decode_rgb(data)
    ok = encode(random_image(np.random.default_rng(0), 40, 48), "JPEG", quality=90, progressive=True)
    assert decode_rgb(ok).size == (48, 40)


@pytest.mark.parametrize("kind,nw", [("torch", 2), ("dali", 0), ("dali", 1)])
def test_hostile_entries_are_counted_bad_samples(kind, nw, hostile):
    root, bad, n = hostile
    ld = _loader(root, kind, bs=n, nw=nw, max_bad_fraction=0.9)
    ld.set_epoch(0)
    (batch,) = list(ld)
    assert batch.shape == (n, 3, 32, 32) and torch.isfinite(batch).all()
    assert ld.bad_samples >= len(bad)
    assert set(ld.bad_examples) and _bad_names(ld, root) <= bad
    ld.close()
    if kind == "dali" and nw == 0:
        assert not ld.rejected  # mcf's checks caught everything before DALI's decoder saw it
        other = _loader(root, "torch", bs=n, max_bad_fraction=0.9)
        other.set_epoch(0)
        list(other)
        assert other.bad_samples == ld.bad_samples  # the same rule in both loaders


def test_build_and_verify_list_hostile_entries(hostile, tmp_path):
    from mcf.data import build_lmdb, verify_dataset

    root, bad, n = hostile
    m = build_lmdb(root, tmp_path / "db", workers=0, progress=False)
    assert m["count"] == 24 and {rel for rel, _ in m["bad"]} == bad
    reasons = dict(m["bad"])
    assert reasons["hostile/dangling.jpg"].startswith("unreadable (No such file")
    assert reasons["hostile/broken_marker.jpg"].startswith("corrupt JPEG")
    r = verify_dataset(root, progress=False)
    assert r["count"] == n and {os.path.relpath(name, root) for name, _ in r["bad"]} == bad


@pytest.mark.parametrize("kind,nw", [("torch", 2), ("dali", 0)])
def test_files_changed_after_the_scan(kind, nw, tmp_path):
    make_folder(tmp_path, 20)
    ld = _loader(tmp_path, kind, bs=20, nw=nw, max_bad_fraction=0.9)  # the scan happens here
    (tmp_path / "img000.png").unlink()
    (tmp_path / "img001.jpg").unlink()
    (tmp_path / "img001.jpg").mkdir()
    (tmp_path / "img002.png").unlink()
    os.mkfifo(tmp_path / "img002.png")
    (tmp_path / "img003.jpg").write_bytes(b"")
    (tmp_path / "img004.png").unlink()
    (tmp_path / "img004.png").symlink_to("/dev/zero")  # reading it would never end
    ld.set_epoch(0)
    (batch,) = list(ld)
    assert batch.shape == (20, 3, 32, 32)
    assert ld.bad_samples >= 5
    assert _bad_names(ld, tmp_path) <= {"img000.png", "img001.jpg", "img002.png", "img003.jpg", "img004.png"}
    ld.close()


@pytest.mark.parametrize("kind", ["torch", "dali"])
def test_all_unreadable_stops_with_one_line(kind, tmp_path):
    for i in range(4):
        (tmp_path / f"link{i}.jpg").symlink_to(tmp_path / f"missing{i}.jpg")
    os.mkfifo(tmp_path / "fifo.jpg")
    (tmp_path / "dir.jpg").mkdir()
    (tmp_path / "dir.jpg" / "x.png").write_bytes(b"not a png")
    ld = _loader(tmp_path, kind, bs=2, nw=2 if kind == "torch" else 0)
    ld.set_epoch(0)
    with pytest.raises(DataError, match=r"in a row failed to decode or read on rank 0, starting at .+ \(.+\): ") as e:
        list(ld)
    assert "\n" not in str(e.value)
    assert ld.kind != "torch" or ld._loader._iterator is None  # closed on the error: no worker left waiting


def test_dali_decoder_rejects_at_run_time_are_bad_samples(tmp_path, monkeypatch, caplog):
    """A file that passes mcf's checks but that DALI's decoder fails on (as nvJPEG may) fails its
    batch; the loader finds it, counts it as a bad sample from then on, and carries on."""
    import mcf.data.core.source as source_mod

    make_folder(tmp_path, 16)
    real = source_mod.prepare_for_dali
    poison = jpeg_with_broken_marker(random_image(np.random.default_rng(1), 40, 40))

    def leaky(data, max_pixels):  # mcf's check "misses" img005.jpg: DALI gets bytes it rejects
        out = real(data, max_pixels)
        return (poison, 40, 40) if data == (tmp_path / "img005.jpg").read_bytes() else out

    monkeypatch.setattr(source_mod, "prepare_for_dali", leaky)
    ld = _loader(tmp_path, "dali", bs=4, max_bad_fraction=0.5)
    batches = []
    with caplog.at_level("WARNING", logger="mcf.data.loaders.dali_loader"):
        for epoch in (0, 1):
            ld.set_epoch(epoch)
            batches += [b.clone() for b in ld]
    assert len(batches) == 8 and all(torch.isfinite(b).all() for b in batches)
    assert ld.rejected == {5}
    assert ld.bad_samples == 2  # met once per epoch
    assert [r.getMessage() for r in caplog.records if "rejects" in r.getMessage()] == [
        f"DALI's decoder rejects 1 file(s) that pass mcf's checks; they count as bad samples: {tmp_path / 'img005.jpg'}"
    ]
    ld.close()


# -- whole processes: exit status, one line, nothing left behind ----------------------------------------------


def _group_members(pgid: int) -> list[int]:
    """Live processes of the process group ``pgid`` (zombies excluded)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                out.append(int(d))
    return out


def _wait_group_gone(pgid: int, timeout: float = 15.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := _group_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def _run_group(cmd, timeout=240):
    """Run ``cmd`` in its own session; returns (rc, stderr, processes of its group still alive)."""
    p = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        pytest.fail(f"{' '.join(cmd[2:5])} did not exit within {timeout} s")
    left = _wait_group_gone(p.pid)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    return p.returncode, out, err, left


def _pretrain(out, data, kind, *extra):
    """``mcf pretrain`` (demo preset, shortened) on ``data`` with the ``kind`` loader and 2 workers."""
    args = pretrain_args(out, 2, "--data", str(data), "--set", "data.num_workers=2", *extra)
    args[args.index("--loader") + 1] = kind
    return [sys.executable, "-m", "mcf", "pretrain", *args]


@pytest.mark.parametrize("kind", ["torch", "dali"])
def test_pretrain_counts_unreadable_entries_and_finishes(kind, hostile, tmp_path):
    root, _, _ = hostile
    cmd = _pretrain(tmp_path / "run", root, kind, "--batch-size", "8", "--max-bad-fraction", "0.9")
    rc, _, err, left = _run_group(cmd)
    assert rc == 0, err[-3000:]
    assert not left, f"processes left behind: {left}"
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 2 and records[-1]["bad_samples"] >= 1
    assert "Traceback" not in err


@pytest.mark.parametrize("kind", ["torch", "dali"])
def test_pretrain_on_only_broken_files_exits_2_with_one_line(kind, tmp_path):
    d = tmp_path / "broken"
    d.mkdir()
    for i in range(6):
        (d / f"x{i}.jpg").write_text("not an image\n")
    (d / "gone.jpg").symlink_to(d / "nowhere.jpg")
    os.mkfifo(d / "fifo.jpg")
    rc, _, err, left = _run_group(_pretrain(tmp_path / "run", d, kind, "--batch-size", "4"))
    assert rc == 2, err[-3000:]
    errors = [ln for ln in err.splitlines() if ln.startswith("mcf: error:")]
    assert len(errors) == 1 and "failed to decode or read" in errors[0] and str(d) in errors[0]
    assert "Traceback" not in err
    assert not left, f"processes left behind: {left}"


def test_killed_loaders_leave_no_workers(tmp_path):
    """SIGKILL to the process that owns the loaders: their DataLoader workers and DALI's spawned
    source workers die with it (PR_SET_PDEATHSIG); before, they stayed as orphans."""
    make_folder(tmp_path / "imgs", 16)
    script = (
        "import sys, torch\n"
        "from mcf.data import DataConfig, build_pretrain_loader\n"
        "lds = [build_pretrain_loader(DataConfig(path=sys.argv[1], loader=k, num_workers=2), img_size=32, "
        "batch_size=4,\n"
        "       rank=0, world_size=1, seed=0, device=torch.device('cpu')) for k in ('torch', 'dali')]\n"
        "its = [iter(ld) for ld in lds]\n"
        "[next(it) for it in its]\n"
        "print('ready', flush=True)\n"
        "sys.stdin.read()\n"
    )
    p = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "imgs")], cwd=ROOT, env=env(),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        workers = [pid for pid in _group_members(p.pid) if pid != p.pid]
        assert len(workers) >= 4  # 2 DataLoader + 2 DALI workers
        p.kill()
        p.wait()
        left = _wait_group_gone(p.pid)
        assert not left, f"orphaned workers: {left}"
    finally:
        for pid in _group_members(p.pid):
            os.kill(pid, signal.SIGKILL)


def test_build_lmdb_killed_leaves_no_workers(tmp_path):
    make_folder(tmp_path / "src", 400)
    cmd = [sys.executable, "-m", "mcf", "data", "build-lmdb", str(tmp_path / "src"), str(tmp_path / "db"),
           "--workers", "2", "--chunk-size", "1", "--no-progress"]
    p = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while len(_group_members(p.pid)) < 3 and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert p.poll() is None, "the build finished before it could be killed: make it bigger"
        assert len(_group_members(p.pid)) >= 3  # the main process and its 2 workers
        p.kill()
        p.wait()
        left = _wait_group_gone(p.pid)
        assert not left, f"orphaned build-lmdb workers: {left}"
    finally:
        for pid in _group_members(p.pid):
            os.kill(pid, signal.SIGKILL)
