"""Every host sync of a training step, mcf's and DeepSpeed's (issue 22 item 5), counted on the CPU.

tests/count_syncs.py patches the tensor methods that make the host wait for the device on a GPU (``item``,
``tolist``, ``__bool__``, ``__float__``, ``__int__``, ``__index__``) and records each call's site per step.
``numpy()`` and the loader's calls (``mcf/data``) are left out: they read host tensors (the batch's
bookkeeping before the images go to the device), never a device value. The README's table is this count.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from train_helpers import ROOT, command, env, pretrain_args

STEPS = 5  # steps 2..STEPS-1 are steady: step 1 warms up, the last logs and checkpoints
TRAINER_SYNC = "tolist mcf/train/trainer.py:_step_sync"  # the one all-reduce of (non-finite, stop, data error)


def step_syncs(tmp_path, precision: str, zero: int, clip: float) -> list[list[str]]:
    out = tmp_path / "syncs.json"
    args = pretrain_args(tmp_path / "run", STEPS, "--precision", precision, "--zero", str(zero), "--set",
                         f"optim.grad_clip={clip}", "--checkpoint-every", "1000", log_every=1000)
    cmd = [sys.executable, str(ROOT / "tests" / "count_syncs.py"), *command(args)[3:]]
    r = subprocess.run(cmd, cwd=ROOT, env=env(MCF_SYNC_OUT=str(out)), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    per_step = json.loads(out.read_text())
    return [sorted(s for s in per_step.get(str(k), []) if not s.startswith("numpy") and " mcf/data/" not in s)
            for k in range(2, STEPS)]


@pytest.mark.parametrize("precision, zero, clip, want", [
    ("bf16", 1, 0.0, [TRAINER_SYNC]),  # DeepSpeed's overflow .item() is off (bf16.check_grad_overflow=false)
    ("bf16", 2, 1.0, [TRAINER_SYNC] + ["__bool__ deepspeed/runtime/utils.py:is_invalid_grad_norm"] * 2),  # clipping
])
def test_host_syncs_per_step(tmp_path, precision, zero, clip, want):
    steps = step_syncs(tmp_path, precision, zero, clip)
    assert steps == [sorted(want)] * (STEPS - 2), steps
