"""``launchers/slurm/pretrain.sbatch`` against a real one-node slurm started by the test.

Two CPU tasks (gloo) on the demo model: a job runs to the end and its checkpoint loads; a job that
receives SIGUSR1 mid-run checkpoints, requeues itself, and the requeued job (same id, same output
folder) resumes with ``--resume auto`` to the last step without repeating one.
Skipped with the reason where slurm cannot start (no root, no apt, ports taken); failed on CI.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest
import torch
from slurm_cluster import slurm_or_skip

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "launchers" / "slurm" / "pretrain.sbatch"
SBATCH_DS = REPO / "launchers" / "slurm" / "pretrain_deepspeed.sbatch"
# Two CPU ranks on one node; these override the script's GPU defaults (8 tasks/GPUs per node).
CPU_TASKS = ("--nodes", "1", "--ntasks", "2", "--ntasks-per-node", "2", "--cpus-per-task", "1", "--gpus-per-node=0")
JOB_TIMEOUT = 420  # seconds for a whole job; ~1 min on an idle 2-core machine


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = slurm_or_skip(tmp_path_factory.mktemp("slurm"), cpus=2)
    try:
        yield c
    finally:
        c.stop()


def submit(cluster, tmp: Path, name: str, *trainer_args: str, script: Path = SBATCH) -> tuple[int, Path, Path]:
    """sbatch a real script with 2 CPU ranks; returns (job id, output folder, job log)."""
    runs = tmp / "runs"
    env = {
        "MCF_PYTHON": sys.executable,
        "MCF_RUNS_DIR": str(runs),
        "MCF_SLURM_GPUS": "0",
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    tasks = CPU_TASKS
    if script == SBATCH_DS:  # one task (the deepspeed launcher) on the node, which starts 2 ranks
        tasks = ("--nodes", "1", "--ntasks-per-node", "1", "--cpus-per-task", "2", "--gpus-per-node=0")
        env["MCF_RANKS_PER_NODE"] = "2"
        env["TORCH_EXTENSIONS_DIR"] = os.environ.get("TORCH_EXTENSIONS_DIR", str(tmp / "torch_extensions"))
        env["OMP_NUM_THREADS"] = None  # as on a cluster: the deepspeed launcher sets none, mcf chooses per rank
    job = cluster.sbatch(
        "--job-name", name, *tasks, "--time", "15", "--output", str(tmp / "%x-%j.out"), "--chdir", str(REPO),
        str(script), "--config", "demo", "--batch-size", "2", "--log-every", "1", "--checkpoint-every", "1000",
        "--tracking-uri", "none", *trainer_args,
        env=env,
    )
    return job, runs / f"{name}-{job}", tmp / f"{name}-{job}.out"


def read_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def log_of(log: Path) -> str:
    return log.read_text(errors="replace")[-6000:] if log.exists() else "(no job log)"


def test_sbatch_trains_and_checkpoint_loads(cluster, tmp_path):
    from mcf.train.checkpoint import load_consolidated

    job, out, log = submit(cluster, tmp_path, "mcf-plain", "--max-steps", "2")
    info = cluster.wait_final(job, JOB_TIMEOUT)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{log_of(log)}"
    text = log.read_text()
    assert "2 tasks" in text and "2 rank(s)" in text, text[-3000:]
    assert read_steps(out) == [1, 2]
    final = out / "checkpoints" / "step_00000002"
    assert (final / "COMPLETE").exists()
    state = load_consolidated(final)
    assert state["step"] == 2 and state["online"] and state["target"]
    assert any(k.startswith("encoder.") for k in state["online"])
    weights = [v for v in state["online"].values() if v.is_floating_point()]
    assert weights and all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights)


@pytest.mark.parametrize("script", [SBATCH, SBATCH_DS], ids=["srun", "deepspeed"])
def test_signal_checkpoints_requeues_and_resumes(cluster, tmp_path, script):
    """srun starts the ranks, or one deepspeed launcher per node does (which must pass the ranks'
    exit status 3 through)."""
    max_steps = 10
    job, out, log = submit(cluster, tmp_path, "mcf-requeue", "--max-steps", str(max_steps), script=script)

    # Signal once the trainer is in its loop (its handlers are installed): at least one step logged.
    deadline = time.monotonic() + JOB_TIMEOUT
    while not read_steps(out):
        assert time.monotonic() < deadline, f"no step logged in {JOB_TIMEOUT} s\n{log_of(log)}"
        assert cluster.job(job).get("JobState") in ("PENDING", "RUNNING"), f"{cluster.job(job)}\n{log_of(log)}"
        time.sleep(0.2)
    r = cluster.run("scancel", "--signal=USR1", "--batch", str(job))
    assert r.returncode == 0, r.stderr

    # The batch script requeues the job: same id, Restarts=1, pending on slurm's requeue delay
    # (BeginTime, ~2 min), which the test skips by making the job eligible now.
    cluster.wait(
        job, lambda i: int(i.get("Restarts", 0)) >= 1 or i.get("JobState") in {"COMPLETED", "FAILED", "CANCELLED"}, 120
    )
    before = read_steps(out)
    info = cluster.job(job)
    assert int(info.get("Restarts", 0)) == 1, f"the job was not requeued: {info}\n{log_of(log)}"
    stopped = re.search(r"stopped by signal at step (\d+)", log.read_text())
    assert stopped, log_of(log)
    stop_step = int(stopped.group(1))
    assert stop_step < max_steps, "the run ended before the signal reached it; raise max_steps"
    assert before[-1] == stop_step and (out / "checkpoints" / f"step_{stop_step:08d}" / "COMPLETE").exists()
    # slurmd refuses to relaunch a job id within the second in which it killed it (credentials are
    # revoked at one-second granularity: "Job N already killed, do not launch batch job"), which is
    # why slurm itself delays requeued jobs; a few seconds are enough here.
    time.sleep(3)
    cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")

    info = cluster.wait_final(job, JOB_TIMEOUT)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{text[-6000:]}"
    assert "requeueing job" in text and "restart 1" in text and "2 rank(s)" in text
    if script == SBATCH_DS:  # 2 ranks from one launcher in one `srun -c 2` task share its 2 CPUs (they took 2 each)
        threads = re.findall(
            r"(\d+) CPU threads per rank \((.*?local ranks \(LOCAL_SIZE\); OMP_NUM_THREADS was unset)\)", text
        )
        assert threads and {n for n, _ in threads} == {"1"}, (threads, text[-4000:])
    assert f"resumed from {out / 'checkpoints' / f'step_{stop_step:08d}'}" in text or f"(step {stop_step}," in text, (
        text[-4000:]
    )
    steps = read_steps(out)
    assert steps == list(range(1, max_steps + 1)), f"steps across the requeue: {steps}"
    assert (out / "checkpoints" / f"step_{max_steps:08d}" / "COMPLETE").exists()


def test_scancel_does_not_requeue(cluster, tmp_path):
    """A plain scancel (SIGTERM) lets the ranks checkpoint, but the job stays cancelled.

    A stand-in for the trainer (MCF_PYTHON) exits 3 on SIGTERM/SIGUSR1 like the real one, so this
    checks the batch script's requeue rule in seconds."""
    fake = tmp_path / "fake-python"
    fake.write_text(f"#!{sys.executable}\n"
                    "import signal, sys, time\n"
                    "def stop(*_):  # like the trainer: later signals are ignored while it exits\n"
                    "    for s in (signal.SIGTERM, signal.SIGUSR1):\n"
                    "        signal.signal(s, signal.SIG_IGN)\n"
                    "    sys.exit(3)\n"
                    "for s in (signal.SIGTERM, signal.SIGUSR1):\n"
                    "    signal.signal(s, stop)\n"
                    "print('fake trainer', *sys.argv[1:4], flush=True)\n"
                    "time.sleep(120)\n")
    fake.chmod(0o755)
    job = cluster.sbatch(
        "--job-name",
        "mcf-cancel",
        *CPU_TASKS,
        "--time",
        "5",
        "--output",
        str(tmp_path / "%x-%j.out"),
        str(SBATCH),
        "--max-steps",
        "5",
        env={"MCF_PYTHON": str(fake), "MCF_RUNS_DIR": str(tmp_path / "runs"), "MCF_SLURM_GPUS": "0"},
    )
    log = tmp_path / f"mcf-cancel-{job}.out"
    deadline = time.monotonic() + 60
    while not (log.exists() and log.read_text().count("fake trainer -m mcf") == 2):
        assert time.monotonic() < deadline, log_of(log)
        time.sleep(0.2)
    assert cluster.run("scancel", str(job)).returncode == 0
    info = cluster.wait_final(job, 60)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", info
    # slurm marks the job CANCELLED at once; the batch script writes its verdict a moment later
    deadline = time.monotonic() + 30
    while "not requeueing" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "not requeueing" in log.read_text(), log_of(log)
    time.sleep(2)  # a requeue, had the script made one, would show by now
    assert cluster.job(job).get("JobState") == "CANCELLED" and cluster.job(job).get("Restarts") == "0", cluster.job(job)


def test_a_stalled_step_requeues_a_bounded_number_of_times(cluster, tmp_path):
    """Exit 4 (a rank's step stalled, mcf.train.STALL_EXIT_CODE) requeues the job to resume from its
    last checkpoint, but only MCF_STALL_REQUEUES times over its restarts: a stall that follows the job
    ends it with 4 instead of looping. A stand-in for the trainer exits 4 at once."""
    fake = tmp_path / "fake-python"
    fake.write_text(f"#!{sys.executable}\nimport sys\nprint('fake trainer', *sys.argv[1:4], flush=True)\nsys.exit(4)\n")
    fake.chmod(0o755)
    job = cluster.sbatch("--job-name", "mcf-stall", *CPU_TASKS, "--time", "5", "--output", str(tmp_path / "%x-%j.out"),
                         str(SBATCH), "--max-steps", "5",
                         env={"MCF_PYTHON": str(fake), "MCF_RUNS_DIR": str(tmp_path / "runs"), "MCF_SLURM_GPUS": "0",
                              "MCF_STALL_REQUEUES": "1"})
    log = tmp_path / f"mcf-stall-{job}.out"
    cluster.wait(
        job, lambda i: int(i.get("Restarts", 0)) >= 1 or i.get("JobState") in {"COMPLETED", "FAILED", "CANCELLED"}, 120
    )
    assert int(cluster.job(job).get("Restarts", 0)) == 1, f"{cluster.job(job)}\n{log_of(log)}"
    assert "stall requeue 1 of 1" in log.read_text(), log_of(log)
    time.sleep(3)  # slurmd refuses to relaunch a job id within the second it killed it (see above)
    cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    info = cluster.wait_final(job, JOB_TIMEOUT)
    text = log.read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"].startswith("4:"), f"{info}\n{text[-4000:]}"
    assert info["Restarts"] == "1" and "already requeued 1 time(s)" in text and "not requeueing" in text, text[-4000:]


def test_unavailable_slurm_skips_or_fails_on_ci(tmp_path, monkeypatch):
    import slurm_cluster

    monkeypatch.setattr(slurm_cluster.os, "geteuid", lambda: 1000)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="not root"):
        slurm_or_skip(tmp_path)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="required on CI"):
        slurm_or_skip(tmp_path)
