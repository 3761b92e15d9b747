"""One run per output folder (mcf/train/runlock.py): the second run exits 2 at once naming the
holder; a lock whose process died (kill -9) or whose node went silent is taken over; a slurm
requeue waits for its earlier instance and refuses while it still runs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from train_helpers import check, complete_steps, kill_tree, losses, metrics, pretrain_args, run, start, wait_for

from mcf.errors import RunLockedError, StorageError
from mcf.train.runlock import LOCK_NAME, Holder, RunLock


def write_lock(folder, age_s: float = 0.0, **fields) -> None:
    """A lock file as another run would have left it, its heartbeat ``age_s`` seconds old."""
    folder.mkdir(parents=True, exist_ok=True)
    holder = {**Holder.me().__dict__, "token": "someone-else", **fields}
    path = folder / LOCK_NAME
    path.write_text(json.dumps(holder))
    t = time.time() - age_s
    os.utime(path, (t, t))


def test_second_lock_is_refused_naming_the_holder_and_released_on_exit(tmp_path):
    with RunLock(tmp_path / "run") as first:
        t0 = time.monotonic()
        with pytest.raises(RunLockedError) as e:
            RunLock(tmp_path / "run").acquire()
        assert time.monotonic() - t0 < 2
        msg = str(e.value)
        assert (
            f"pid {os.getpid()} on host {socket.gethostname()}, started {first.me.started}" in msg and "\n" not in msg
        )
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    RunLock(tmp_path / "run").acquire().release()


def test_lock_of_a_dead_process_on_this_machine_is_taken_over(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_lock(tmp_path / "a", pid=dead.pid)
    write_lock(tmp_path / "b", pid=os.getpid(), proc_start=1)  # our pid, but another process's start time: pid reuse
    for name, reason in (("a", f"process {dead.pid} is gone"), ("b", "now belongs to another process")):
        lock = RunLock(tmp_path / name).acquire()
        assert json.loads((tmp_path / name / LOCK_NAME).read_text())["token"] == lock.me.token
        assert reason in caplog.text
        lock.release()


def test_foreign_host_lock_stale_heartbeat_taken_over_fresh_refused(tmp_path, caplog):
    write_lock(tmp_path / "old", age_s=600, host="node-17", boot_id="b", pidns="p", pid=4242)
    RunLock(tmp_path / "old", stale_s=120).acquire().release()
    assert "no heartbeat for 6" in caplog.text and "pid 4242 on host node-17" in caplog.text
    write_lock(tmp_path / "fresh", age_s=5, host="node-17", boot_id="b", pidns="p", pid=4242)
    t0 = time.monotonic()
    with pytest.raises(RunLockedError, match="in use by another run: pid 4242 on host node-17"):
        RunLock(tmp_path / "fresh", stale_s=120).acquire()
    assert time.monotonic() - t0 < 2
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / LOCK_NAME).write_text("{half a lo")
    with pytest.raises(RunLockedError):
        RunLock(tmp_path / "garbage", stale_s=60).acquire()
    os.utime(tmp_path / "garbage" / LOCK_NAME, (time.time() - 100, time.time() - 100))
    RunLock(tmp_path / "garbage", stale_s=60).acquire().release()


@pytest.mark.parametrize("old_instance_alive", [True, False])
def test_slurm_requeue_waits_for_its_earlier_instance(tmp_path, monkeypatch, old_instance_alive):
    """The requeued job (restart 1) finds restart 0's lock from another node: it proceeds once that
    lock goes silent, and refuses if the old instance keeps its heartbeat going."""
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    write_lock(tmp_path, host="node-3", boot_id="b", pidns="p", slurm_job="77", slurm_restart=0)
    stop = threading.Event()

    def heartbeat():
        while not stop.wait(0.1):
            os.utime(tmp_path / LOCK_NAME)

    beating = threading.Thread(target=heartbeat, daemon=True)
    if old_instance_alive:
        beating.start()
    t0 = time.monotonic()
    try:
        if old_instance_alive:
            with pytest.raises(RunLockedError, match=r"slurm job 77 \(restart 0\)"):
                RunLock(tmp_path, stale_s=1).acquire()
        else:
            RunLock(tmp_path, stale_s=1).acquire().release()
    finally:
        stop.set()
    assert 1 <= time.monotonic() - t0 < 10


def test_heartbeat_refreshes_the_lock_and_a_file_is_no_folder(tmp_path):
    lock = RunLock(tmp_path / "run", stale_s=1).acquire()  # heartbeat every 0.2 s
    try:
        path = tmp_path / "run" / LOCK_NAME
        os.utime(path, (time.time() - 50, time.time() - 50))
        wait_for(lambda: time.time() - path.stat().st_mtime < 5, 10, what="the heartbeat")
    finally:
        lock.release()
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match="is a file"):
        RunLock(tmp_path / "file").acquire()


def test_concurrent_runs_then_kill9_then_rerun(tmp_path):
    out = tmp_path / "run"
    args = pretrain_args(out, 60, log_every=10)
    first = start(args, launcher="python", log=tmp_path / "first.log")
    try:
        wait_for(lambda: metrics(out), 300, first, "the first run's step 10")
        # the first run is held still (alive, lock held) while the second one looks: on a loaded machine
        # it could otherwise finish its 60 steps before the second one has started
        os.kill(first.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            second = run(args, launcher="python", timeout=120)
            took = time.monotonic() - t0
        finally:
            os.kill(first.pid, signal.SIGCONT)
        assert first.poll() is None, "the first run ended before the second one looked"
        lines = [x for x in second.stderr.splitlines() if x.startswith("mcf: error:")]
        assert second.returncode == 2 and len(lines) == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
        assert f"is in use by another run: pid {first.pid} on host {socket.gethostname()}" in lines[0]
        assert took < 120, took  # it stops before building the model (MLflow's retries, DeepSpeed: minutes)
        assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        kill_tree(first)
    assert [r["step"] for r in metrics(out)] == [10, 20, 30, 40, 50, 60] and complete_steps(out) == [60]
    assert not (out / LOCK_NAME).exists()
    # kill -9 a resumed run once it holds the lock: the lock stays behind, naming a dead process
    killed = start(pretrain_args(out, 80, log_every=10), launcher="python", log=tmp_path / "killed.log")
    try:
        wait_for(
            lambda: (out / LOCK_NAME).is_file() and f'"pid": {killed.pid},' in (out / LOCK_NAME).read_text(),
            120,
            killed,
            "the lock",
        )
    finally:
        kill_tree(killed, signal.SIGKILL)
    assert (out / LOCK_NAME).is_file()
    rerun = check(run(pretrain_args(out, 62, log_every=1), launcher="python"))
    assert (
        f"taking over the lock of pid {killed.pid}" in rerun.stderr and f"process {killed.pid} is gone" in rerun.stderr
    )
    assert sorted(losses(out))[-2:] == [61, 62] and not (out / LOCK_NAME).exists()
