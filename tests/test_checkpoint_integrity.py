"""A checkpoint is trusted only once checked: the COMPLETE marker lists every file of every rank with
its size (and SHA-256 on request); a tampered file is refused in one line and never runs, by
``mcf pretrain --resume``, ``mcf export-fp32`` and ``mcf export``; a damaged one makes ``--resume
auto`` fall back to the previous intact checkpoint and an explicit path exit 2 naming the file."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from test_serialization import write_payload
from train_helpers import check, complete_steps, losses, pretrain_args, run

from mcf.errors import CheckpointError, StorageError, UnsafeCheckpointError
from mcf.serialization import safe_load
from mcf.train import checkpoint as ckpt
from mcf.train import integrity

STEP4 = "checkpoints/step_00000004"
FILES = {"model": "mp_rank_00_model_states.pt", "optimizer": "zero_pp_rank_0_mp_rank_00_optim_states.pt",
         "mcf_state": "mcf_state.pt", "rank": "rank_00000.pt"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """1 rank, ZeRO-1 (an optimizer shard), checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("trained") / "run"
    check(
        run(
            pretrain_args(out, 4, "--zero", "1", "--checkpoint-every", "2", "--set", "checkpoint.keep_last=3"),
            launcher="python",
        )
    )
    assert complete_steps(out) == [2, 4]
    return out


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def one_error_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.startswith("mcf: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def test_marker_lists_every_file_with_its_size(trained):
    step = trained / STEP4
    marker = json.loads((step / "COMPLETE").read_text())
    assert marker["format"] == "mcf-complete/2" and marker["step"] == 4
    on_disk = {p.name: p.stat().st_size for p in step.glob("*.pt")}
    assert {k: v["size"] for k, v in marker["files"].items()} == on_disk and set(on_disk) == set(FILES.values())
    integrity.verify(step)


@pytest.mark.parametrize("kind", list(FILES))
def test_tampered_file_is_refused_by_export_and_export_fp32(trained, tmp_path, capsys, kind):
    from mcf.cli import main

    run_dir = copy_run(trained, tmp_path / "run")
    target = run_dir / STEP4 / FILES[kind]
    marker = tmp_path / "PWNED"
    write_payload(target, marker, safe_load(target))  # the real content plus a payload
    for argv in (
        ["export-fp32", str(run_dir), str(tmp_path / "w.pt")],
        ["export", str(run_dir / STEP4), str(tmp_path / "e.safetensors")],
    ):
        assert main(argv) == 2
        line = one_error_line(capsys.readouterr().err)
        assert f"refusing to load {target}: it holds posix.system" in line, line
    assert not marker.exists() and not (tmp_path / "w.pt").exists()


def test_tampered_file_is_refused_by_resume(trained, tmp_path):
    """Even under --resume auto (an intact step 2 exists): a checkpoint that holds code was altered on
    purpose, which is not something to fall back from silently. (Every .pt file of the folder is
    scanned the same way; the other kinds are covered in-process above.)"""
    run_dir = copy_run(trained, tmp_path / "run")
    target = run_dir / STEP4 / FILES["model"]
    marker = tmp_path / "PWNED"
    write_payload(target, marker, safe_load(target))
    p = run(pretrain_args(run_dir, 6, "--zero", "1"), launcher="python")
    line = one_error_line(p.stderr)
    assert p.returncode == 2 and f"refusing to load {target}: it holds posix.system" in line
    assert not marker.exists() and complete_steps(run_dir) == [2, 4]


def test_damaged_newest_checkpoint_auto_falls_back(trained, tmp_path):
    run_dir = copy_run(trained, tmp_path / "run")
    (run_dir / STEP4 / FILES["model"]).unlink()
    p = check(run(pretrain_args(run_dir, 4, "--zero", "1"), launcher="python"))
    assert "checkpoint step_00000004 is damaged, trying the previous one" in p.stderr
    assert FILES["model"] in p.stderr and "resumed from" in p.stderr and "step_00000002 (step 2" in p.stderr
    assert complete_steps(run_dir) == [2, 4] and sorted(losses(run_dir)) == [1, 2, 3, 4]
    integrity.verify(run_dir / STEP4)  # rewritten whole


def test_damaged_explicit_checkpoint_exits_2_naming_the_file(trained, tmp_path, capsys):
    from mcf.cli import main

    run_dir = copy_run(trained, tmp_path / "run")
    shard = run_dir / STEP4 / FILES["optimizer"]
    shard.write_bytes(shard.read_bytes()[:-1000])
    p = run(pretrain_args(run_dir, 6, "--zero", "1", "--resume", str(run_dir / STEP4)), launcher="python")
    assert p.returncode == 2 and f"{shard} is " in one_error_line(p.stderr) and "cut short or replaced" in p.stderr
    rank_file = run_dir / STEP4 / FILES["rank"]
    shard.write_bytes((trained / STEP4 / FILES["optimizer"]).read_bytes())
    rank_file.write_bytes(rank_file.read_bytes()[:100])
    assert main(["export-fp32", str(run_dir / STEP4), str(tmp_path / "w.pt")]) == 2
    assert f"{rank_file} is 100 bytes, its COMPLETE marker says" in one_error_line(capsys.readouterr().err)


# -- in-process: markers, verification, writes --------------------------------------------------------
def fake_checkpoint(root: Path, step: int, hash_files: bool = False) -> Path:
    """A step folder written like a real save: files through CheckpointWriter, then the marker."""
    d = root / ckpt.step_dir_name(step)
    d.mkdir(parents=True)
    writer = integrity.CheckpointWriter(None)
    writer.begin(hash_files)
    for name in ("mcf_state.pt", "rank_00000.pt"):
        writer.write({"w": torch.full((100,), float(step))}, d / name)
    files, error = writer.report(d)
    assert error is None and set(files) == {"mcf_state.pt", "rank_00000.pt"}
    integrity.write_marker(d, step, files)
    return d


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "COMPLETE").write_text("garbage{"), "not an mcf checkpoint marker"),
        (
            lambda d: (d / "COMPLETE").write_text(
                json.dumps({"format": "mcf-complete/2", "step": 4, "files": {"../x.pt": {"size": 1}}})
            ),
            "not a file of this folder",
        ),
        (
            lambda d: (d / "COMPLETE").write_text(json.dumps({"format": "mcf-complete/2", "step": 9, "files": {}})),
            "names step 9",
        ),
        (lambda d: (d / "COMPLETE").write_text("7\n"), "names step 7"),
        (lambda d: (d / "rank_00000.pt").unlink(), "rank_00000.pt is missing"),
        (lambda d: os.truncate(d / "mcf_state.pt", 10), "is 10 bytes"),
        (
            lambda d: (
                shutil.move(d / "mcf_state.pt", d.parent / "elsewhere.pt"),
                os.symlink(d.parent / "elsewhere.pt", d / "mcf_state.pt"),
            ),
            "symbolic link",
        ),
    ],
)
def test_verify_refuses_damage(tmp_path, damage, message):
    d = fake_checkpoint(tmp_path / "checkpoints", 4)
    integrity.verify(d)
    damage(d)
    with pytest.raises(CheckpointError, match=message) as e:
        integrity.verify(d)
    assert not isinstance(e.value, UnsafeCheckpointError)


def test_hash_option_catches_same_size_corruption_and_old_markers_still_load(tmp_path):
    d = fake_checkpoint(tmp_path / "checkpoints", 4, hash_files=True)
    f = d / "mcf_state.pt"
    assert json.loads((d / "COMPLETE").read_text())["files"]["mcf_state.pt"]["sha256"]
    data = bytearray(f.read_bytes())
    data[-200] ^= 0xFF  # one flipped bit in the middle of a tensor: same size
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match the SHA-256"):
        integrity.verify(d)
    old = fake_checkpoint(tmp_path / "checkpoints", 6)
    (old / "COMPLETE").write_text("6\n")  # mcf-pretrain-v1 marker
    torch.save({}, old / "mp_rank_00_model_states.pt")  # what DeepSpeed always writes (checked under old markers)
    integrity.verify(old)


def test_auto_falls_back_past_every_damaged_one_and_never_prunes_the_one_in_use(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        fake_checkpoint(root, step)
    (root / "step_00000006" / "COMPLETE").write_text("{")
    (root / "step_00000004" / "rank_00000.pt").unlink()
    assert ckpt.find_resume("auto", tmp_path).name == "step_00000002"
    ckpt.prune(root, keep_last=1, upto=2)  # as after resuming step 2: the later (damaged) ones do not count
    assert [d.name for d in ckpt.list_checkpoints(root)] == ["step_00000002", "step_00000004", "step_00000006"]
    (root / "step_00000002" / "mcf_state.pt").unlink()
    with pytest.raises(CheckpointError, match="no intact checkpoint .*--resume none"):
        ckpt.find_resume("auto", tmp_path)
    (root).rename(tmp_path / "moved")
    (tmp_path / "checkpoints").write_text("a file where the folder should be")
    with pytest.raises(CheckpointError, match="is a file"):
        ckpt.find_resume("auto", tmp_path)


def test_full_disk_while_writing_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    """ENOSPC from /dev/full (no root needed): the error names the path and says 'no space left'."""
    real_open = open

    def full_open(path, mode="r", *a, **k):
        return real_open("/dev/full", mode, *a, **k) if str(path).endswith(".tmp") else real_open(path, mode, *a, **k)

    monkeypatch.setattr("builtins.open", full_open)
    writer = integrity.CheckpointWriter(None)
    writer.write({"w": torch.ones(10)}, tmp_path / "mcf_state.pt")
    writer.write({"w": torch.ones(10)}, tmp_path / "rank_00000.pt")  # skipped: the save has failed already
    assert writer.error.startswith(f"no space left on device writing {tmp_path / 'mcf_state.pt'}")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(StorageError, match="no space left on device writing .*COMPLETE"):
        integrity.write_marker(tmp_path, 4, {})
