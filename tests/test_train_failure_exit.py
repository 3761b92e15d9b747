"""An unexpected error inside the training loop ends the process (found by the CPU rehearsal of
benchmarks/gpu_check.sh, where a failing `train.compile` run never exited).

The loader's workers ignore SIGTERM (a scancel must not kill them mid-checkpoint). When an uncaught
exception's traceback kept the batch generator alive until interpreter exit, multiprocessing's exit
handler sent them SIGTERM, which they ignore, and then joined them forever.
"""

from __future__ import annotations

import subprocess
import sys

from train_helpers import ROOT, command, env, kill_tree, pretrain_args

DEADLINE_S = 120  # the failing 2-step run exits in ~15 s on an idle 2-core machine


def test_uncaught_error_in_the_loop_exits_with_loader_workers(tmp_path):
    args = pretrain_args(tmp_path / "run", 3, "--set", "data.num_workers=2")
    cmd = [
        sys.executable,
        str(ROOT / "tests" / "fail_in_loop.py"),
        *command(args)[3:],
    ]  # `mcf pretrain ...` minus the interpreter
    log = tmp_path / "run.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rc = proc.wait(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        raise AssertionError(f"no exit within {DEADLINE_S} s after the error\n{log.read_text()[-2000:]}") from None
    text = log.read_text()
    assert rc == 1 and "injected failure in the training loop" in text, text[-3000:]
