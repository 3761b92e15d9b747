"""Rank 0's long checkpoint conversion on a resume with another number of ranks (issue 22 item 3): the other
ranks wait for it without a collective (which the process group's timeout would abort), with progress lines,
and a conversion still in progress elsewhere is waited for, never deleted."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

from train_helpers import ROOT, env, free_port

from mcf.train import checkpoint as ckpt
from mcf.train.runlock import RunLock

# rank 0's converter takes CONVERT_S seconds, far past the process group's PG_TIMEOUT_S
WORKER = '''
import logging, sys, time
from datetime import timedelta
from pathlib import Path
import torch.distributed as dist
from deepspeed.checkpoint import ds_to_universal
from mcf.train import checkpoint as ckpt
logging.basicConfig(level=logging.INFO, format="%(message)s")
step_dir, pg_timeout, convert_s = Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
ckpt.CONVERT_LOG_S, ckpt.CONVERT_POLL_S = 1.0, (0.05, 0.5)  # the final barrier has a 3 s timeout here
def slow_convert(args):
    time.sleep(convert_s)
    (Path(args.output_folder) / "zero").mkdir(parents=True)
ds_to_universal.main = slow_convert
dist.init_process_group("gloo", timeout=timedelta(seconds=pg_timeout))
out = ckpt.universal_copy(step_dir, dist.get_rank())
print(f"rank {dist.get_rank()} got {out.name}", flush=True)
dist.barrier()
dist.destroy_process_group()
'''
PG_TIMEOUT_S, CONVERT_S = 3, 8


def test_the_other_ranks_outwait_the_collective_timeout_without_a_collective(tmp_path):
    step_dir = tmp_path / "step_00000004"
    step_dir.mkdir()
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(step_dir), str(PG_TIMEOUT_S), str(CONVERT_S)],
            cwd=ROOT,
            env=env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=180)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    assert [p.returncode for p in procs] == [0, 0], "\n---\n".join(outs)
    assert "rank 0 got universal" in outs[0] and "rank 1 got universal" in outs[1]
    assert "waiting for rank 0's conversion of" in outs[1] and "still waiting for rank 0's conversion" in outs[1], outs[
        1
    ]
    assert (step_dir / ckpt.UNIVERSAL / "zero").is_dir() and not (step_dir / f".{ckpt.UNIVERSAL}.tmp").exists()


def test_a_conversion_in_progress_elsewhere_is_waited_for_not_deleted(tmp_path, monkeypatch):
    from deepspeed.checkpoint import ds_to_universal

    step_dir = tmp_path / "step_00000004"
    scratch = step_dir / f".{ckpt.UNIVERSAL}.tmp"
    other = RunLock(scratch, 60).acquire()  # a live converter (its heartbeat runs)
    partial = scratch / ckpt.UNIVERSAL / "zero" / "half_written.pt"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"x" * 100)
    monkeypatch.setattr(ds_to_universal, "main", lambda args: (_ for _ in ()).throw(AssertionError("converted twice")))
    monkeypatch.setattr(ckpt, "CONVERT_POLL_S", (0.05, 0.1))

    def finish():  # the other converter moves its result into place, then releases its lock
        time.sleep(1.0)
        assert partial.exists()  # still there while it works
        (scratch / ckpt.UNIVERSAL).rename(step_dir / ckpt.UNIVERSAL)
        other.release()

    t = threading.Thread(target=finish)
    t.start()
    out = ckpt.universal_copy(step_dir, 0, wait_s=30)
    t.join()
    assert out == step_dir / ckpt.UNIVERSAL and (out / "zero" / "half_written.pt").read_bytes() == b"x" * 100
