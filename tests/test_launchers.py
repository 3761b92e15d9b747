"""The launch scripts, end to end on CPU: two "nodes" on this machine rendezvous over 127.0.0.1.

Each launcher is started twice, ``--node-rank 0`` and ``--node-rank 1``, one rank per node (gloo);
the run must finish with world size 2 on both, write one complete checkpoint holding both ranks'
state, and log the same losses whichever launcher started it (fp32 is deterministic here, and the
logged loss is the mean over both ranks, so equal logs mean the ranks computed the same thing).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = REPO / "launchers" / "torchrun.sh"
DEEPSPEED = REPO / "launchers" / "deepspeed" / "launch.sh"
MAX_STEPS = 3
TIMEOUT = 420  # seconds per two-node run; ~1 min on an idle 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env() -> dict[str, str]:
    env = dict(
        os.environ, MCF_PYTHON=sys.executable, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
        MLFLOW_DISABLE_TELEMETRY="true",
    )
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def trainer_args(out: Path) -> list[str]:
    return ["--config", "demo", "--batch-size", "2", "--max-steps", str(MAX_STEPS), "--log-every", "1",
            "--checkpoint-every", "1000", "--tracking-uri", "none", "--seed", "0", "--output-dir", str(out)]


def run_nodes(cmds: list[list[str]], logdir: Path) -> list[str]:
    """Start one process per "node", wait for all (bounded), return their logs; fail on any error."""
    procs, logs = [], []
    for i, cmd in enumerate(cmds):
        f = open(logdir / f"node{i}.log", "w")
        logs.append(f)
        procs.append(
            subprocess.Popen(
                cmd, cwd=REPO, env=launcher_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True
            )
        )
    try:
        for p in procs:
            p.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for f in logs:
            f.close()
    texts = [(logdir / f"node{i}.log").read_text(errors="replace") for i in range(len(cmds))]
    for i, (p, text) in enumerate(zip(procs, texts)):
        assert p.returncode == 0, f"node {i} exited {p.returncode}:\n{text[-4000:]}"
    return texts


def check_run(out: Path, logs: list[str]) -> list[dict]:
    assert any("2 rank(s)" in t for t in logs), "the trainer did not report world size 2:\n" + logs[0][-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, MAX_STEPS + 1))
    final = out / "checkpoints" / f"step_{MAX_STEPS:08d}"
    assert (final / "COMPLETE").exists()
    assert sorted(p.name for p in final.glob("rank_*.pt")) == ["rank_00000.pt", "rank_00001.pt"]
    return records


@pytest.fixture(scope="module")
def deepspeed_no_ssh(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ds")
    hostfile = tmp / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")  # never contacted with --no-ssh
    port, out = free_port(), tmp / "run"
    cmds = [
        [
            "bash", str(DEEPSPEED), "--hostfile", str(hostfile), "--gpus-per-node", "1", "--no-ssh", "--node-rank",
            str(r), "--master-addr", "127.0.0.1", "--master-port", str(port), *trainer_args(out),
        ]
        for r in (0, 1)
    ]
    return out, run_nodes(cmds, tmp)


@pytest.fixture(scope="module")
def torchrun_two_nodes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("torchrun")
    port, out = free_port(), tmp / "run"
    cmds = [["bash", str(TORCHRUN), "--nnodes", "2", "--node-rank", str(r), "--nproc-per-node", "1",
             "--master-addr", "127.0.0.1", "--master-port", str(port), *trainer_args(out)] for r in (0, 1)]
    return out, run_nodes(cmds, tmp)


def test_deepspeed_no_ssh_two_nodes(deepspeed_no_ssh):
    out, logs = deepspeed_no_ssh
    check_run(out, logs)
    assert "dist_world_size=2" in logs[0] and "node_rank=1" in logs[1]


def test_torchrun_two_nodes(torchrun_two_nodes):
    check_run(*torchrun_two_nodes)


def test_launchers_agree(deepspeed_no_ssh, torchrun_two_nodes):
    ds = [json.loads(line) for line in (deepspeed_no_ssh[0] / "metrics.jsonl").read_text().splitlines()]
    tr = [json.loads(line) for line in (torchrun_two_nodes[0] / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(ds, tr, strict=True):
        assert a["step"] == b["step"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (
            f"step {a['step']}: deepspeed {a['loss']} vs torchrun {b['loss']}"
        )


@pytest.mark.parametrize("script", [TORCHRUN, DEEPSPEED], ids=["torchrun", "deepspeed"])
def test_help(script):
    r = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "mcf pretrain" in r.stdout and "MCF_PYTHON" in r.stdout


@pytest.mark.parametrize("script", [TORCHRUN, DEEPSPEED], ids=["torchrun", "deepspeed"])
def test_help_is_the_header_comment_only(script):
    r = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, timeout=30)
    assert "set -euo" not in r.stdout and r.stdout.splitlines()[0].startswith("Start `mcf pretrain`")


def test_torchrun_sh_picks_and_checks_a_python_with_torch_and_mcf(tmp_path):
    """Without MCF_PYTHON the script finds an interpreter that imports torch and mcf (not a bare `python`); --dry-run
    refuses one that cannot, in one line naming it."""
    e = {k: v for k, v in launcher_env().items() if k != "MCF_PYTHON"}
    r = subprocess.run(["bash", str(TORCHRUN), "--dry-run", "--nproc-per-node", "1"], capture_output=True, text=True,
                       timeout=120, env=e, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    py = shlex.split(r.stdout)[0]
    assert subprocess.run([py, "-c", "import torch, mcf"], env=e, timeout=120).returncode == 0, py
    bare = tmp_path / "python"
    bare.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'torch'\" >&2; exit 1\n")
    bare.chmod(0o755)
    r = subprocess.run(["bash", str(TORCHRUN), "--dry-run"], capture_output=True, text=True, timeout=60,
                       env=dict(e, MCF_PYTHON=str(bare)))
    assert r.returncode == 2 and r.stdout == "", r.stderr
    assert f"MCF_PYTHON={bare} cannot import torch and mcf" in r.stderr, r.stderr


@pytest.mark.parametrize("args, message", [
    (["--no-ssh", "--node-rank", "0", "--master-addr", "127.0.0.1"], "needs --hostfile"),
    (["--hostfile", "/etc/hostname", "--no-ssh", "--master-addr", "127.0.0.1"], "needs --node-rank"),
    (["--hostfile", "/etc/hostname", "--no-ssh", "--node-rank", "1"], "needs --master-addr"),
    (["--hostfile", "/nonexistent/hosts"], "not readable"),
    (["--master-port"], "needs a value"),
])
def test_deepspeed_rejects_incomplete_no_ssh(args, message):
    env = {k: v for k, v in launcher_env().items() if k not in ("MASTER_ADDR", "NODE_RANK", "MCF_HOSTFILE")}
    r = subprocess.run(["bash", str(DEEPSPEED), *args], capture_output=True, text=True, timeout=30, env=env)
    assert r.returncode == 2 and message in r.stderr
