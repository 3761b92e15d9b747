"""Helpers of the trainer tests: run ``mcf pretrain`` as 1 process, under torchrun or the deepspeed
launcher (DeepSpeed cannot be initialised twice in one process), and read its outputs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ)
    # (MLFLOW_*: a team store exported in the environment is not the tests')
    for k in (
        "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
        "MCF_OVERRIDES", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME",
    ):
        e.pop(k, None)
    e.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", MLFLOW_DISABLE_TELEMETRY="true", PYTHONPATH=str(ROOT),
             TORCH_EXTENSIONS_DIR=str(ROOT / ".torch_extensions"), PYTHONUNBUFFERED="1")
    e.update(extra)
    return e


def pretrain_args(out: Path, steps: int, *extra: str, log_every: int = 1) -> list[str]:
    """The demo preset, shortened: every step logged, no MLflow, the torch loader, no progress bar."""
    return [
        "--config", "demo", "--output-dir", str(out), "--max-steps", str(steps), "--log-every", str(log_every),
        "--tracking-uri", "none", "--loader", "torch", "--set", "logging.progress=false", "--set", "data.num_workers=0",
        "--set", "logging.recon_every=0", *extra,
    ]


def command(args: list[str], nproc: int = 1, launcher: str = "python") -> list[str]:
    if launcher == "python" or (launcher == "torchrun" and nproc == 1):
        return [sys.executable, "-m", "mcf", "pretrain", *args]
    if launcher == "torchrun":
        return [
            str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(free_port()), "-m", "mcf",
            "pretrain", *args,
        ]
    if launcher == "deepspeed":
        return [str(BIN / "deepspeed"), "--no_local_rank", "--num_gpus", str(nproc), "--master_port", str(free_port()),
                "--module", "mcf", "pretrain", *args]
    raise ValueError(launcher)


def run(
    args: list[str], nproc: int = 1, launcher: str = "torchrun", timeout: float = 300, **env_extra: str
) -> subprocess.CompletedProcess:
    return subprocess.run(
        command(args, nproc, launcher), cwd=ROOT, env=env(**env_extra), capture_output=True, text=True, timeout=timeout
    )


def start(
    args: list[str], nproc: int = 1, launcher: str = "torchrun", log: Path | None = None, **env_extra: str
) -> subprocess.Popen:
    """Start in a new session (so the whole launcher tree can be killed at once)."""
    out = open(log, "w") if log else subprocess.DEVNULL
    return subprocess.Popen(
        command(args, nproc, launcher), cwd=ROOT, env=env(**env_extra), stdout=out, stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its workers in sessions of their own)."""
    out, todo = [], [pid]
    while todo:
        children = subprocess.run(["pgrep", "-P", str(todo.pop())], capture_output=True, text=True).stdout.split()
        out += [int(c) for c in children]
        todo += [int(c) for c in children]
    return out


def kill_tree(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to the process we started and to all its descendants at once (a crashed node)."""
    pids = [proc.pid, *descendants(proc.pid)]
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)
    wait_for(lambda: not any(_alive(pid) for pid in pids[1:]), 60, what="the killed processes to exit")


def _alive(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return False


def metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(out) if "loss" in r}


def wait_for(pred, timeout: float, proc: subprocess.Popen | None = None, what: str = "condition") -> None:
    t0 = time.time()
    while not pred():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode} before {what}")
        if time.time() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def complete_steps(out: Path) -> list[int]:
    root = out / "checkpoints"
    return sorted(int(d.name[5:]) for d in root.glob("step_*") if (d / "COMPLETE").is_file()) if root.is_dir() else []


def check(proc: subprocess.CompletedProcess, rc: int = 0) -> subprocess.CompletedProcess:
    assert proc.returncode == rc, (
        f"exit {proc.returncode} (wanted {rc})\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    )
    return proc
