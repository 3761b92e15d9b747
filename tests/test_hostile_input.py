"""Hostile or unlucky input (issue 23): nothing hangs, nothing mcf did not create is deleted, and every
failure is one clear line. Each test is one case of a class: crafted pickles, tar headers, brace patterns,
stalled streams, output folders that hold the source or another run."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import time

import pytest
import torch

from mcf.errors import CheckpointError, DataError


def self_sharing_list(depth: int = 60) -> list:
    """A list that holds itself twice, ``depth`` levels deep: 2**depth paths, depth + 1 objects (2 KB)."""
    a: list = [0]
    for _ in range(depth):
        a = [a, a]
    return a


@pytest.mark.timeout(60)
def test_shared_references_load_in_linear_time(tmp_path):
    from mcf.serialization import safe_load

    torch.save({"model": {"w": torch.zeros(2)}, "junk": self_sharing_list()}, tmp_path / "a.pth")
    assert (tmp_path / "a.pth").stat().st_size < 4096
    obj = safe_load(tmp_path / "a.pth")
    assert obj["junk"][0] is obj["junk"][1]  # memo of the unpickler kept: one object, walked once


@pytest.mark.timeout(60)
def test_export_of_a_self_sharing_pickle_ends(tmp_path):
    torch.save({"args": self_sharing_list()}, tmp_path / "a.pth")
    proc = subprocess.run(
        [sys.executable, "-m", "mcf", "export", str(tmp_path / "a.pth"), str(tmp_path / "x.safetensors")],
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("mcf: error:"), proc.stderr[-2000:]


@pytest.mark.timeout(60)
def test_too_deep_nesting_is_one_line(tmp_path):
    from mcf.serialization import MAX_DEPTH, safe_load

    a: list = []
    for _ in range(MAX_DEPTH + 5):
        a = [a]
    torch.save({"x": a}, tmp_path / "deep.pth")
    with pytest.raises(CheckpointError, match=f"nest more than {MAX_DEPTH} deep"):
        safe_load(tmp_path / "deep.pth")


# -- crafted tar headers (the indexer reads headers only; the stream reader goes through tarfile) ---------
def _header(name: str, size: int, typ: bytes = b"0") -> bytes:
    ti = tarfile.TarInfo(name)
    ti.size, ti.type = size, typ
    return ti.tobuf(format=tarfile.USTAR_FORMAT)


def _member(name: str, data: bytes) -> bytes:
    return _header(name, len(data)) + data + b"\0" * (-len(data) % 512)


def _pax(records: bytes) -> bytes:
    return _header("././@PaxHeader", len(records), tarfile.XHDTYPE) + records + b"\0" * (-len(records) % 512)


PNG = b"\x89PNG\r\n\x1a\n" + bytes(100)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("records", [b"0 size=5\n", b"13 size=-512\n", b"12 size=-0x\n", b"99 path=x\n", b"5 a=b\n",
                                     b"x size=5\n"])
def test_crafted_pax_headers_end_the_shard(tmp_path, records):
    """A pax length that does not advance, runs past its header or is not a number, and a negative or
    malformed ``size=``: the shard is damaged there (the sample before it kept); never a loop, never a
    negative length in the index."""
    from mcf.data.core.tar_index import count_stream, index_tar

    path = tmp_path / "s.tar"
    path.write_bytes(_member("a.png", PNG) + _pax(records) + _member("b.png", PNG) + bytes(1024))
    samples, damage = index_tar(str(path))
    assert samples == [(512, len(PNG))] and damage and ("at byte 1024" in damage or "at byte 2048" in damage), damage
    with open(path, "rb") as f:
        assert count_stream(f) == (1, damage)  # the stream reader validates the same way


@pytest.mark.timeout(60)
def test_huge_pax_header_in_a_stream_is_damage_not_a_read_into_memory(tmp_path):
    from mcf.data.core.tar_index import MAX_META_BYTES, count_stream

    path = tmp_path / "s.tar"
    path.write_bytes(_member("a.png", PNG) + _header("././@PaxHeader", 1 << 31, tarfile.XHDTYPE) + bytes(4096))
    with open(path, "rb") as f:
        n, damage = count_stream(f)
    assert n == 1 and f"pax header of {1 << 31} bytes" in damage and str(MAX_META_BYTES) in damage


@pytest.mark.timeout(60)
def test_member_over_4_gib_is_indexed_with_64_bit_lengths(tmp_path):
    """A 4 GiB + 1000 byte member (a sparse file: only the headers are written) is indexed with its
    true length, not an OverflowError of 32-bit lengths."""
    from mcf.data.core.index import IndexFile
    from mcf.data.formats.shards import ShardTable, build_shard_index, resolve_shards

    big = 2**32 + 1000
    path = tmp_path / "big.tar"
    with open(path, "wb") as f:
        f.write(_member("a.png", PNG) + _header("b.png", big))
        f.seek(f.tell() + big + (-big % 512))
        f.write(bytes(1024))
    meta, arrays = build_shard_index(resolve_shards(path), workers=1)
    table = ShardTable(IndexFile(meta, arrays))
    assert table.samples(0) == [(512, len(PNG)), (1536, big)]


@pytest.mark.timeout(60)
def test_remote_count_never_holds_a_member(tmp_path):
    """Counting a streamed shard for its index holds no member in memory, whatever its size (an 8 MiB
    member here: the peak stays under 3 MiB)."""
    import tracemalloc

    import mcf.data.core.tar_index as ti

    path = tmp_path / "s.tar"
    path.write_bytes(_member("a.png", PNG) + _member("b.png", bytes(8 << 20)) + bytes(1024))
    with open(path, "rb", buffering=0) as f:
        tracemalloc.start()
        try:
            assert ti.count_stream(f) == (2, None)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert peak < 3 << 20, peak


@pytest.mark.timeout(120)
@pytest.mark.parametrize("tamper", ["list", "object", "float", "negative", "meta"])
def test_tampered_shard_index_is_rebuilt(tmp_path, tamper):
    """A shard index whose header was tampered with (arrays as a list, an object or float dtype, a
    negative shape, meta not a dict) is rebuilt, not a traceback."""
    import json

    from shard_helpers import make_shards

    from mcf.data.core.index import MAGIC
    from mcf.data.formats.shards import open_shard_index, resolve_shards

    make_shards(tmp_path / "d", sizes=(3, 2))
    spec = resolve_shards(tmp_path / "d")
    first = open_shard_index(spec, workers=1)
    path = first.idx.path
    raw = path.read_bytes()
    hlen = int.from_bytes(raw[8:16], "little")
    header = json.loads(raw[16 : 16 + hlen])
    name = next(iter(header["arrays"]))
    if tamper == "list":
        header["arrays"] = list(header["arrays"].items())
    elif tamper == "object":
        header["arrays"][name][0] = "|O"
    elif tamper == "float":
        header["arrays"]["count"][0] = "<f8"
    elif tamper == "negative":
        header["arrays"][name][1] = [-5]
    else:
        header["meta"] = [1, 2]
    text = json.dumps(header).encode()
    text = text + b" " * (hlen - len(text)) if len(text) <= hlen else text[:hlen]
    path.write_bytes(MAGIC + raw[8:16] + text + raw[16 + hlen :])
    again = open_shard_index(spec, workers=1)
    assert again.total == 5


# -- naming shards ------------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_brace_patterns_expand_like_bash_and_are_bounded_before_expansion():
    from mcf.data.formats.shards import MAX_SHARDS, brace_count, expand_braces, resolve_shards

    assert expand_braces("{0..10}") == [str(i) for i in range(11)]  # bash, webdataset: no padding
    assert expand_braces("{00..10}")[:2] == ["00", "01"] and expand_braces("{8..010}")[0] == "008"
    assert expand_braces("{3..1}") == ["3", "2", "1"]
    assert brace_count("s{0..999999}{0..9999999}.tar") == 10**13  # counted, not expanded
    assert brace_count("{0..99999999999999999999}") == 10**20  # past what len() can count
    t0 = time.process_time()
    with pytest.raises(DataError, match=f"more than the limit of {MAX_SHARDS:,}"):
        resolve_shards("/nowhere/{0..9999999}.tar")
    with pytest.raises(DataError, match="more than the limit"):
        resolve_shards("pipe:cat /x/{0..999999}{0..9999999}.tar")
    assert time.process_time() - t0 < 5  # nothing of size 10^7 was built (the old code took 26 s, 2.5 GB)


@pytest.mark.timeout(60)
def test_shard_list_bounded_as_a_whole_with_bom_and_directories(tmp_path):
    from shard_helpers import make_shards

    from mcf.data.formats.shards import MAX_SHARDS, resolve_shards

    make_shards(tmp_path / "d", sizes=(2, 2))
    lst = tmp_path / "list.txt"
    lst.write_bytes("\ufeffd/00000.tar\nd/00001.tar\n".encode())  # a byte-order mark, as Windows editors write
    assert [os.path.basename(u) for u in resolve_shards(lst).urls] == ["00000.tar", "00001.tar"]
    lst.write_text("d/00000.tar\nd\n")
    with pytest.raises(DataError, match="is a directory"):
        resolve_shards(lst)
    n = MAX_SHARDS // 2 + 1
    lst.write_text(f"pipe:cat a{{1..{n}}}.tar\npipe:cat b{{1..{n}}}.tar\n")  # each line under the limit, the list over
    with pytest.raises(DataError, match="more than the limit"):
        resolve_shards(lst)


@pytest.mark.timeout(60)
def test_shards_one_folder_down_are_named_not_no_images(tmp_path):
    from shard_helpers import make_shards

    from mcf.data import open_dataset

    make_shards(tmp_path / "root" / "train", sizes=(2,))
    with pytest.raises(DataError, match=f"{tmp_path / 'root' / 'train'} holds .tar shards"):
        open_dataset(tmp_path / "root")


# -- builds never delete what mcf did not make ------------------------------------------------------------
def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.timeout(120)
def test_build_shards_overwrite_checks_everything_before_deleting(tmp_path):
    from data_helpers import make_folder

    from mcf.data import build_lmdb
    from mcf.data.tools import shards_build as sb

    make_folder(tmp_path / "data" / "src", 6)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    before = _tree(tmp_path)
    build = dict(workers=0, progress=False, overwrite=True)
    with pytest.raises(DataError, match="not found"):  # a typo in SRC: OUT untouched
        sb.build_shards(tmp_path / "data" / "srx", tmp_path / "mine", **build)
    with pytest.raises(DataError, match="not the output of an mcf build"):  # a folder mcf did not make
        sb.build_shards(tmp_path / "data" / "src", tmp_path / "mine", **build)
    with pytest.raises(DataError, match="contains the source"):  # OUT a parent of SRC
        sb.build_shards(tmp_path / "data" / "src", tmp_path / "data", **build)
    with pytest.raises(DataError, match="is inside the source"):
        sb.build_shards(tmp_path / "data" / "src", tmp_path / "data" / "src" / "out", **build)
    with pytest.raises(DataError, match="is inside the source"):
        build_lmdb(tmp_path / "data" / "src", tmp_path / "data" / "src" / "db", **build)
    assert _tree(tmp_path) == before
    sb.build_shards(tmp_path / "data" / "src", tmp_path / "shards", **build)
    with pytest.raises(DataError, match="is the source"):  # SRC == OUT: the source is never deleted
        sb.build_shards(tmp_path / "shards", tmp_path / "shards", **build)
    lst = tmp_path / "data" / "list.txt"
    lst.write_text(f"{tmp_path / 'shards' / '00000.tar'}\n")
    with pytest.raises(DataError, match="contains the source"):  # the shards a list names are the source too
        sb.build_shards(lst, tmp_path / "shards", **build)
    assert (tmp_path / "shards" / "00000.tar").is_file()
    sb.build_shards(tmp_path / "data" / "src", tmp_path / "shards", max_count=2, **build)  # its own output: replaced
    assert len(list((tmp_path / "shards").glob("*.tar"))) == 3


@pytest.mark.timeout(120)
def test_build_shards_onto_a_symlink_or_a_broken_partial_is_one_line(tmp_path):
    from data_helpers import make_folder

    from mcf.data.tools import shards_build as sb

    make_folder(tmp_path / "src", 4)
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for out in ("link", "dangling"):
        with pytest.raises(DataError, match="symbolic link"):
            sb.build_shards(tmp_path / "src", tmp_path / out, workers=0, progress=False)
    (tmp_path / "out.partial").mkdir()
    (tmp_path / "out.partial" / "progress.json").write_text("{broken")
    with pytest.raises(DataError, match="progress.json is damaged"):
        sb.build_shards(tmp_path / "src", tmp_path / "out", workers=0, progress=False)
    (tmp_path / "out.partial" / "progress.json").unlink()
    (tmp_path / "out.partial" / "thesis.tmp").write_text("not mcf's")
    with pytest.raises(DataError, match="not an interrupted build-shards"):
        sb.build_shards(tmp_path / "src", tmp_path / "out", workers=0, progress=False)
    assert (tmp_path / "out.partial" / "thesis.tmp").read_text() == "not mcf's"


# -- streams that stall ---------------------------------------------------------------------------------------
def _dead(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie waiting for init to reap it
    except FileNotFoundError:
        return True


@pytest.mark.timeout(120)
def test_stalled_pipe_shard_becomes_bad_samples_and_its_children_die(tmp_path, caplog):
    """A pipe: command that writes part of a shard and then hangs (an object store that stalls): the
    epoch ends within data.stream_stall_s with the rest of that shard substituted and counted, one log
    line names it; the command's children had the default signal mask, not the loader's ignored
    SIGTERM/SIGUSR1, and are killed with their process group when the stream closes."""
    import logging
    import signal

    from shard_helpers import make_shards

    from mcf.data import DataConfig, build_pretrain_loader

    make_shards(tmp_path / "s", (6, 6))
    flag, status, pidfile = tmp_path / "stall", tmp_path / "status", tmp_path / "pid"
    part = (tmp_path / "s" / "00001.tar").stat().st_size // 3
    stalling = (
        f"pipe:if [ -e {flag} ]; then head -c {part} {tmp_path}/s/00001.tar; grep -E 'SigBlk|SigIgn' "
        f"/proc/self/status > {status}; sleep 300 & echo $! > {pidfile}; wait; else cat {tmp_path}/s/00001.tar; fi"
    )
    lst = tmp_path / "list.txt"
    lst.write_text(f"pipe:cat {tmp_path}/s/00000.tar\n{stalling}\n")

    def loader():
        cfg = DataConfig(path=str(lst), loader="torch", num_workers=0, shuffle_buffer=12, max_bad_fraction=0.9,
                         stream_stall_s=1.5)
        return build_pretrain_loader(cfg, img_size=32, batch_size=12, rank=0, world_size=1, seed=0,
                                     device=torch.device("cpu"))

    assert len(loader()) == 1  # indexed while the command still delivers its shard
    flag.touch()
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGTERM, signal.SIGUSR1)}  # as a worker
    try:
        run = loader()
        run.set_epoch(0)
        t0 = time.monotonic()
        with caplog.at_level(logging.WARNING):
            batches = list(run)
        elapsed = time.monotonic() - t0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert len(batches) == 1 and torch.isfinite(batches[0]).all() and run.bad_samples >= 3
    assert elapsed < 30
    assert any("stalled" in r.getMessage() and "stream_stall_s" in r.getMessage() for r in caplog.records)
    masks = dict(line.split(":") for line in status.read_text().splitlines())
    assert int(masks["SigIgn"], 16) & (1 << (signal.SIGTERM - 1) | 1 << (signal.SIGUSR1 - 1)) == 0
    assert int(masks["SigBlk"], 16) == 0
    sleeper = int(pidfile.read_text())
    deadline = time.monotonic() + 10
    while not _dead(sleeper) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _dead(sleeper), "the stalled command's child outlived the stream"


@pytest.mark.timeout(60)
def test_a_trickling_pipe_is_stalled_too(tmp_path):
    """A stream that never stops but delivers a few bytes at a time slower than 64 KiB per
    stream_stall_s of waiting is as stalled as one that stops (a per-read timeout would wait forever)."""
    from mcf.data.formats.shards import StalledStream, open_stream

    cmd = "pipe:while true; do printf x; sleep 0.05; done"
    t0 = time.monotonic()
    with pytest.raises(StalledStream), open_stream(cmd, stall_s=1.0) as f:
        while f.read(1):
            pass
    assert time.monotonic() - t0 < 20


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["torch", "dali"])
def test_local_shard_replaced_by_a_fifo_mid_run_is_bad_samples(tmp_path, kind):
    """A local shard replaced by a FIFO after it was indexed: never opened for reading (open() of a
    FIFO waits for a writer forever); its samples are bad, substituted and counted."""
    from shard_helpers import make_shards

    from mcf.data import DataConfig, build_pretrain_loader

    make_shards(tmp_path / "s", (6, 6))
    cfg = DataConfig(path=str(tmp_path / "s"), loader=kind, num_workers=0 if kind == "torch" else 1, shuffle_buffer=12,
                     max_bad_fraction=0.9)
    run = build_pretrain_loader(
        cfg, img_size=32, batch_size=12, rank=0, world_size=1, seed=0, device=torch.device("cpu")
    )
    os.remove(tmp_path / "s" / "00001.tar")
    os.mkfifo(tmp_path / "s" / "00001.tar")
    run.set_epoch(0)
    (batch,) = list(run)
    assert torch.isfinite(batch).all() and run.bad_samples >= 6


# -- checkpoints ----------------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("marker", ["old", "empty"])
@pytest.mark.parametrize("lost", ["rank_00000.pt", "mcf_state.pt", "mp_rank_00_model_states.pt", "rank_00001.pt",
                                  "zero_pp_rank_1_mp_rank_00_optim_states.pt"])
def test_auto_falls_back_when_a_file_is_missing_under_a_marker_that_lists_none(tmp_path, marker, lost):
    """A checkpoint whose marker is of the old format (the step alone) or lists no files, and that lacks a
    file every save writes (2 ranks, ZeRO-1 here): damaged, so --resume auto takes the previous one."""
    from test_checkpoint_integrity import fake_checkpoint

    from mcf.train import checkpoint as ckpt

    root = tmp_path / "checkpoints"
    fake_checkpoint(root, 2)
    d = root / "step_00000004"
    d.mkdir()
    for name in ("mcf_state.pt", "mp_rank_00_model_states.pt", "rank_00000.pt", "rank_00001.pt",
                 "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"):
        torch.save({"w": torch.zeros(3)}, d / name)
    (d / "COMPLETE").write_text("4\n" if marker == "old" else '{"format": "mcf-complete/2", "step": 4, "files": {}}')
    assert ckpt.find_resume("auto", tmp_path) == d
    (d / lost).unlink()
    assert ckpt.find_resume("auto", tmp_path).name == "step_00000002"


# -- run folders ------------------------------------------------------------------------------------------------
def _last_error(err: str) -> str:
    lines = [x for x in err.splitlines() if x.startswith("mcf: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


@pytest.mark.timeout(600)
def test_a_fresh_run_in_a_used_folder_is_an_explicit_choice_and_runs_never_mix(tmp_path):
    from train_helpers import check, complete_steps, losses, pretrain_args, run

    out = tmp_path / "run"
    check(run(pretrain_args(out, 2, "--checkpoint-every", "2", "--seed", "1"), launcher="python"))
    first = (out / "metrics.jsonl").read_bytes()
    for resume in ("none", str(tmp_path / "elsewhere")):
        p = run(pretrain_args(out, 1, "--resume", resume), launcher="python")
        assert p.returncode == 2 and "holds another run" in _last_error(p.stderr) and "--overwrite-run" in p.stderr
    assert (out / "metrics.jsonl").read_bytes() == first and complete_steps(out) == [2]  # nothing touched
    check(
        run(pretrain_args(out, 1, "--resume", "none", "--overwrite-run", "--checkpoint-every", "1"), launcher="python")
    )
    assert complete_steps(out) == [1] and sorted(losses(out)) == [1]  # only the new run's files
    check(
        run(pretrain_args(out, 2, "--checkpoint-every", "1"), launcher="python")
    )  # --resume auto: the new run goes on
    assert complete_steps(out)[-1] == 2 and sorted(losses(out)) == [1, 2]


@pytest.mark.timeout(120)
def test_output_dir_inside_the_data_is_refused(tmp_path):
    from data_helpers import make_folder
    from train_helpers import pretrain_args, run

    make_folder(tmp_path / "faces", 8)
    p = run(pretrain_args(tmp_path / "faces" / "run", 1, "--data", str(tmp_path / "faces")), launcher="python")
    assert p.returncode == 2 and "lies inside the data" in _last_error(p.stderr)
    assert not (tmp_path / "faces" / "run").exists()


# -- run locks ------------------------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["dir", "fifo"])
def test_lock_path_that_is_not_a_file_is_one_line(tmp_path, kind):
    from mcf.errors import StorageError
    from mcf.train.runlock import LOCK_NAME, RunLock

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK_NAME).mkdir() if kind == "dir" else os.mkfifo(tmp_path / "run" / LOCK_NAME)
    with pytest.raises(StorageError, match="is not a file"):
        RunLock(tmp_path / "run", stale_s=1).acquire()


@pytest.mark.timeout(60)
def test_lock_of_nested_brackets_is_unreadable_not_a_traceback(tmp_path):
    from mcf.errors import RunLockedError
    from mcf.train.runlock import LOCK_NAME, RunLock

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK_NAME).write_text("[" * 60_000)
    with pytest.raises(RunLockedError, match="cannot be read"):
        RunLock(tmp_path / "run", stale_s=60).acquire()
    os.utime(tmp_path / "run" / LOCK_NAME, (time.time() - 100, time.time() - 100))
    RunLock(tmp_path / "run", stale_s=60).acquire().release()  # old and unreadable: stale, taken over


@pytest.mark.timeout(60)
def test_foreign_lock_from_the_future_says_it_never_goes_stale(tmp_path):
    from test_run_lock import write_lock

    from mcf.errors import RunLockedError
    from mcf.train.runlock import RunLock

    write_lock(tmp_path / "run", age_s=-3600, host="node-17", boot_id="b", pidns="p", pid=4242)
    with pytest.raises(RunLockedError) as e:
        RunLock(tmp_path / "run", stale_s=60).acquire()
    assert "in the future" in str(e.value) and "will not go stale" in str(e.value)
    assert "taken over automatically" not in str(e.value)


# -- exports and resumes of the wrong model --------------------------------------------------------------------
def _mcf(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mcf", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.timeout(180)
def test_wrong_shaped_tensor_in_a_safetensors_file_is_one_line(tmp_path):
    """An export whose tensor was edited to another shape: `mcf export` of it exits 2 naming the tensor
    (it used to re-export it silently), and the loader behind finetune --pretrained refuses it the same way."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from test_downstream_export import _model

    from mcf.downstream.export import export
    from mcf.downstream.weights import load_encoder_weights

    torch.save({"online": _model().online.state_dict()}, tmp_path / "c.pt")
    good = export(tmp_path / "c.pt", tmp_path / "good.safetensors")
    with safe_open(str(good), "pt") as f:
        meta = f.metadata()
    sd = load_file(str(good))
    sd["blocks.0.attn.qkv.weight"] = sd["blocks.0.attn.qkv.weight"][:-3].contiguous()
    save_file(sd, str(tmp_path / "bad.safetensors"), metadata=meta)
    p = _mcf("export", str(tmp_path / "bad.safetensors"), str(tmp_path / "again.safetensors"))
    assert p.returncode == 2 and "blocks.0.attn.qkv.weight has shape" in _last_error(p.stderr)
    assert not (tmp_path / "again.safetensors").exists()
    with pytest.raises(CheckpointError, match="blocks.0.attn.qkv.weight has shape"):
        load_encoder_weights(tmp_path / "bad.safetensors")
    (tmp_path / "dir.safetensors").mkdir()
    p = _mcf("export", str(good), str(tmp_path / "dir.safetensors"))
    assert p.returncode == 2 and "is a directory" in _last_error(p.stderr)


@pytest.mark.timeout(60)
def test_run_state_without_train_config_is_damaged_not_a_traceback(tmp_path):
    from mcf.train import checkpoint as ckpt

    d = tmp_path / "step_00000001"
    d.mkdir()
    torch.save({"format": ckpt.FORMAT, "step": 1, "world_size": 1, "config": {"model": {"name": "mcf_vit_tiny"}},
                "target": {}}, d / ckpt.MCF_STATE)
    with pytest.raises(CheckpointError, match="lacks train"):
        ckpt.read_state(d)


@pytest.mark.timeout(600)
def test_resume_or_export_fp32_with_another_model_is_one_line(tmp_path):
    from train_helpers import check, pretrain_args, run

    out = tmp_path / "run"
    check(run(pretrain_args(out, 1, "--checkpoint-every", "1"), launcher="python"))
    p = run(pretrain_args(out, 2, "--model", "mcf_vit_small_patch16"), launcher="python")
    line = _last_error(p.stderr)
    assert p.returncode == 2 and "mcf_vit_tiny" in line and "mcf_vit_small_patch16" in line, p.stderr[-3000:]
    (tmp_path / "w").mkdir()
    p = _mcf("export-fp32", str(out), str(tmp_path / "w"))
    assert p.returncode == 2 and "is a directory" in _last_error(p.stderr)
