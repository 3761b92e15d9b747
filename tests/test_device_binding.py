"""Which GPU a rank uses (issue 11, defect 6), checked on the CPU with faked device counts.

A rank uses ``local_rank % device_count``: with slurm's per-task GPU binding each task sees one GPU
and ``cuda:LOCAL_RANK`` would be an invalid ordinal. ``launchers/torchrun.sh`` starts as many
processes as torch sees GPUs, so CUDA_VISIBLE_DEVICES narrows it (``nvidia-smi -L`` lists them all).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mcf.errors import ConfigError
from mcf.train.engine import bind_device, device_index

TORCHRUN = Path(__file__).resolve().parents[1] / "launchers" / "torchrun.sh"


@pytest.mark.parametrize("local_rank, count, index", [(0, 8, 0), (3, 8, 3), (3, 1, 0), (5, 4, 1), (7, 2, 1)])
def test_device_index_wraps_over_the_visible_devices(local_rank, count, index):
    assert device_index(local_rank, count) == index


class FakeAccelerator:
    """DeepSpeed's accelerator interface, as far as bind_device uses it, with a chosen device count."""

    def __init__(self, count: int):
        self.count, self.current = count, None

    def device_count(self) -> int:
        return self.count

    def set_device(self, index: int) -> None:
        if not 0 <= index < self.count:
            raise RuntimeError("CUDA error: invalid device ordinal")
        self.current = index

    def device_name(self, index: int | None = None) -> str:
        return "cuda" if index is None else f"cuda:{index}"


def test_one_visible_gpu_per_task_binds_every_rank_to_it():
    for local_rank in range(4):  # slurm --gpus-per-task=1: each task sees its own GPU as cuda:0
        accel = FakeAccelerator(1)
        assert bind_device(accel, local_rank) == torch.device("cuda", 0) and accel.current == 0
    accel = FakeAccelerator(8)
    assert bind_device(accel, 5) == torch.device("cuda", 5) and accel.current == 5
    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES"):
        bind_device(FakeAccelerator(0), 0)


FAKE_TORCH = '''import os


class cuda:
    """Like the CUDA runtime on a node of 8 GPUs: CUDA_VISIBLE_DEVICES narrows what is counted."""

    @staticmethod
    def device_count():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is None:
            return 8
        n = 0
        for token in visible.split(","):
            if not token.strip().isdigit() or int(token) >= 8:
                break
            n += 1
        return n

    @staticmethod
    def is_available():
        return cuda.device_count() > 0
'''


def _nproc(tmp_path: Path, python_path: str | None, **env: str) -> str:
    stub_bin = tmp_path / "bin"
    stub_bin.mkdir(exist_ok=True)
    smi = stub_bin / "nvidia-smi"  # lists all 8 GPUs whatever CUDA_VISIBLE_DEVICES says, as the real one does
    smi.write_text("#!/bin/sh\nfor i in 0 1 2 3 4 5 6 7; do echo \"GPU $i: NVIDIA H100 (UUID: GPU-$i)\"; done\n")
    smi.chmod(0o755)
    e = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "NPROC_PER_NODE", "PYTHONPATH")}
    e.update(PATH=f"{stub_bin}:{e['PATH']}", MCF_PYTHON=sys.executable, **env)
    if python_path:
        e["PYTHONPATH"] = python_path
    r = subprocess.run(
        ["bash", str(TORCHRUN), "--dry-run", "--config", "demo"], env=e, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    words = r.stdout.split()
    assert words[-3:] == ["pretrain", "--config", "demo"]
    return words[words.index("--nproc-per-node") + 1]


def test_torchrun_sh_counts_the_gpus_torch_sees(tmp_path):
    fake = tmp_path / "fake_torch"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text(FAKE_TORCH)
    assert _nproc(tmp_path, str(fake)) == "8"
    assert _nproc(tmp_path, str(fake), CUDA_VISIBLE_DEVICES="0,3") == "2"
    assert _nproc(tmp_path, str(fake), CUDA_VISIBLE_DEVICES="5") == "1"
    assert _nproc(tmp_path, str(fake), CUDA_VISIBLE_DEVICES="") == "1"  # no GPU: one (CPU) process
    assert _nproc(tmp_path, str(fake), CUDA_VISIBLE_DEVICES="0,3", NPROC_PER_NODE="3") == "3"  # explicit wins
    # the real torch of this (GPU-less) machine sees none, whatever nvidia-smi lists
    assert _nproc(tmp_path, None, CUDA_VISIBLE_DEVICES="0,1") == "1"


# Runs mcf's process-group start with CUDA faked: DeepSpeed's CUDA accelerator over a torch that reports
# COUNT visible devices; torch.distributed.init_process_group is replaced by a recorder that checks
# device_id as torch does ("device_id cuda:k is out of range") and then starts a one-member gloo group
# in its place (a store of its own), so DeepSpeed's wrapper finds a started group.
INIT_PROBE = '''
import functools, json, os, sys
import torch, torch.distributed as dist
count = int(sys.argv[1])
torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: count
torch.cuda.is_bf16_supported = lambda *a, **k: True
current = []
def set_device(d):
    index = d if isinstance(d, int) else torch.device(d).index
    if not 0 <= index < count:
        raise RuntimeError("CUDA error: invalid device ordinal")
    current.append(index)
torch.cuda.set_device = set_device
calls = []
real_init = dist.init_process_group
@functools.wraps(real_init)  # the same signature: DeepSpeed and mcf see device_id as supported
def fake_init(backend=None, **kw):
    dev = kw.get("device_id")
    calls.append({"backend": backend, "device_id": str(dev) if dev is not None else None,
                  "timeout_s": kw["timeout"].total_seconds() if kw.get("timeout") else None})
    if dev is not None and not 0 <= dev.index < count:
        raise ValueError(f"device_id {dev} is out of range")
    real_init("gloo", store=dist.HashStore(), rank=0, world_size=1)
dist.init_process_group = fake_init
from mcf.train.engine import init_distributed
try:
    _, _, device = init_distributed("bf16", timeout_s=float(sys.argv[2]))
    result = {"device": str(device)}
except Exception as e:
    result = {"error": f"{type(e).__name__}: {e}"}
print("PROBE " + json.dumps({"calls": calls, "current": current, **result}))
'''


@pytest.mark.parametrize("local_rank, count, want", [(1, 1, "cuda:0"), (5, 4, "cuda:1")])
def test_init_process_group_gets_the_bound_device_and_the_timeout(local_rank, count, want):
    """Per-task binding (one visible GPU, LOCAL_RANK >= 1): the arguments that reach init_process_group name the
    device the rank bound, not cuda:LOCAL_RANK (DeepSpeed 0.19.8's choice, which torch rejects), and the timeout."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID")}
    env.update(DS_ACCELERATOR="cuda", RANK=str(local_rank), WORLD_SIZE="8", LOCAL_RANK=str(local_rank),
               MASTER_ADDR="127.0.0.1", MASTER_PORT="29999")
    r = subprocess.run([sys.executable, "-c", INIT_PROBE, str(count), "2700"], env=env, capture_output=True, text=True,
                       timeout=120)
    lines = [x for x in r.stdout.splitlines() if x.startswith("PROBE ")]
    assert lines, r.stdout + r.stderr
    got = json.loads(lines[-1][len("PROBE "):])
    assert got.get("error") is None, got
    assert got["calls"] == [{"backend": "nccl", "device_id": want, "timeout_s": 2700.0}]
    assert got["device"] == want and got["current"] == [int(want.split(":")[1])]
