"""The representation monitor on 2 ranks under ZeRO-3 (issue 11, defect 1).

Under ZeRO-3 the monitor's forward passes gather partitioned parameters (collectives): every rank
must run them, or the ranks that skip them wait in another collective forever. Run as torchrun
subprocesses (gloo); a hang is caught by a deadline, and the whole process tree is killed then.
"""

from __future__ import annotations

import json
import subprocess

from train_helpers import kill_tree, pretrain_args, start

DEADLINE_S = 150  # the 2-step run takes ~30 s on an idle 2-core machine


def test_zero3_monitor_on_two_ranks_finishes_and_rank0_alone_logs(tmp_path):
    out, log = tmp_path / "run", tmp_path / "run.log"
    args = pretrain_args(out, 2, "--zero", "3", "--set", "monitor.every=1", "--checkpoint-every", "1000")
    proc = start(args, nproc=2, log=log)
    try:
        rc = proc.wait(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        raise AssertionError(f"hung: no exit within {DEADLINE_S} s\n{log.read_text()[-3000:]}") from None
    assert rc == 0, log.read_text()[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    monitor_rows = [r for r in rows if any(k.startswith("monitor/") for k in r)]
    assert [r["step"] for r in monitor_rows] == [1, 2]  # rank 0 alone logs, once per step
    assert all(0.0 <= r["monitor/face_knn_acc"] <= 1.0 and r["monitor/recon_mse"] > 0 for r in monitor_rows)
