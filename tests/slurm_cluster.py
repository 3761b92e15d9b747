"""A throw-away single-node slurm cluster for tests (Debian's slurm-wlm, run as root).

``SlurmCluster(workdir)`` is a context manager: on entry it installs the Debian packages if they
are missing (``scripts/ci_slurm_setup.sh``), starts a private munged (own socket), writes a
``slurm.conf`` whose state, spool, logs and pid files all live under ``workdir``, starts
``slurmctld`` and ``slurmd -N localhost`` on free ports and waits for the node to be idle; on exit
it cancels every job, waits for the queue to drain, shuts the daemons down and stops its munged. Every wait is bounded.

Where the machine cannot run slurm (not root, no apt, a daemon that does not come up) entering
raises :class:`SlurmUnavailable` with the reason; :func:`slurm_or_skip` turns that into a pytest
skip, or a failure when ``CI=true``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETUP_SCRIPT = REPO / "scripts" / "ci_slurm_setup.sh"
BINARIES = (
    "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "sinfo", "srun", "scancel", "munged", "munge", "unmunge",
)
MUNGED = "/usr/sbin/munged"

# Job states after which a job will not run again (a requeued job passes through REQUEUED/PENDING).
FINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED",
}


class SlurmUnavailable(RuntimeError):
    """This machine cannot run the test cluster; the message says why."""


def _which(name: str) -> str | None:
    return shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None
    )


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def ensure_packages(timeout: float = 600) -> None:
    """Install slurm and munge from Debian if any binary is missing (needs root and apt-get)."""
    if all(_which(b) for b in BINARIES):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable("slurm is not installed and installing it needs root")
    if not shutil.which("apt-get"):
        raise SlurmUnavailable("slurm is not installed and apt-get is not available")
    try:
        r = subprocess.run(["bash", str(SETUP_SCRIPT)], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SlurmUnavailable(f"installing slurm took over {timeout:.0f} s") from None
    if r.returncode != 0 or not all(_which(b) for b in BINARIES):
        raise SlurmUnavailable(f"installing slurm failed (rc {r.returncode}): {r.stderr.strip()[-800:]}")


class SlurmCluster:
    """One-node slurm (``localhost``, ``cpus`` CPUs) with all state under ``workdir``."""

    def __init__(self, workdir: str | os.PathLike, cpus: int = 2, memory_mb: int = 4000, start_timeout: float = 60):
        self.workdir = Path(workdir)
        self.cpus = cpus
        self.memory_mb = memory_mb
        self.start_timeout = start_timeout
        self.conf = self.workdir / "etc" / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self._started_munged = False
        self.munge_dir: Path | None = None

    @property
    def munge_socket(self) -> str:
        return str(self.munge_dir / "munge.socket") if self.munge_dir else "/run/munge/munge.socket.2"

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> SlurmCluster:
        if os.geteuid() != 0:
            raise SlurmUnavailable("the test slurm cluster runs its daemons as root; this user is not root")
        ensure_packages()
        try:
            self._start_munged()
            self._write_conf()
            self._start_daemons()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _munge_ok(self) -> bool:
        sock = f"--socket={self.munge_socket}"
        enc = subprocess.run(["munge", sock, "-n"], capture_output=True, timeout=10)
        return (
            enc.returncode == 0
            and subprocess.run(["unmunge", sock], input=enc.stdout, capture_output=True, timeout=10).returncode == 0
        )

    def _start_munged(self) -> None:
        """A private munged (own socket, pid and log file) so that clusters never share or stop
        each other's; its folder lives under /run because munged refuses paths that the munge user
        cannot reach (pytest's temp folders are root-only)."""
        self.munge_dir = Path(tempfile.mkdtemp(prefix="mcf-munge-", dir="/run"))
        shutil.chown(self.munge_dir, "munge", "munge")
        self.munge_dir.chmod(0o755)
        d = self.munge_dir
        r = subprocess.run(
            [
                "runuser", "-u", "munge", "--", MUNGED, f"--socket={self.munge_socket}",
                f"--pid-file={d / 'munged.pid'}", f"--log-file={d / 'munged.log'}", f"--seed-file={d / 'munged.seed'}",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if r.returncode != 0:
            raise SlurmUnavailable(f"munged did not start: {r.stderr.strip()}")
        self._started_munged = True
        deadline = time.monotonic() + 15
        while not self._munge_ok():
            if time.monotonic() > deadline:
                raise SlurmUnavailable("munged started but does not answer")
            time.sleep(0.2)

    def _write_conf(self) -> None:
        for sub in ("etc", "state", "spool", "log", "run"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        ctld_port, slurmd_port = _free_ports(2)
        w = self.workdir
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=mcftest",
                    "SlurmctldHost=localhost",
                    f"SlurmctldPort={ctld_port}",
                    f"SlurmdPort={slurmd_port}",
                    "SlurmUser=root",
                    "AuthType=auth/munge",
                    f"AuthInfo=socket={self.munge_socket}",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "JobAcctGatherType=jobacct_gather/none",
                    "AccountingStorageType=accounting_storage/none",
                    "JobCompType=jobcomp/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core",
                    "MpiDefault=none",
                    "MailProg=/bin/true",
                    "ReturnToService=2",
                    "SlurmdParameters=config_overrides",
                    "JobRequeue=1",
                    # Seconds between SIGTERM and SIGKILL when a job ends or is cancelled.
                    "KillWait=10",
                    "InactiveLimit=0",
                    "MinJobAge=300",
                    f"StateSaveLocation={w / 'state'}",
                    f"SlurmdSpoolDir={w / 'spool'}",
                    f"SlurmctldLogFile={w / 'log' / 'slurmctld.log'}",
                    f"SlurmdLogFile={w / 'log' / 'slurmd.log'}",
                    f"SlurmctldPidFile={w / 'run' / 'slurmctld.pid'}",
                    f"SlurmdPidFile={w / 'run' / 'slurmd.pid'}",
                    f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN",
                    "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )

    def _start_daemons(self) -> None:
        for cmd in (["slurmctld", "-f", str(self.conf)], ["slurmd", "-N", "localhost", "-f", str(self.conf)]):
            r = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=30)
            if r.returncode != 0:
                raise SlurmUnavailable(
                    f"{cmd[0]} did not start (rc {r.returncode}): {r.stderr.strip()[-500:]}\n{self.log_tail()}"
                )
        deadline = time.monotonic() + self.start_timeout
        state = ""
        while time.monotonic() < deadline:
            r = subprocess.run(
                ["sinfo", "-h", "-N", "-o", "%T"], env=self.env, capture_output=True, text=True, timeout=15
            )
            state = r.stdout.strip() or r.stderr.strip()
            if r.returncode == 0 and state.startswith("idle"):
                return
            time.sleep(0.5)
        raise SlurmUnavailable(
            f"the slurm node did not become idle in {self.start_timeout:.0f} s (last: {state!r})\n{self.log_tail()}"
        )

    def stop(self, timeout: float = 60) -> None:
        """Cancel all jobs, wait for the queue to drain, shut the daemons down, stop our munged."""
        if self.conf.exists() and _which("scontrol"):
            subprocess.run(["scancel", "--full", "-u", "root"], env=self.env, capture_output=True, timeout=15)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                r = subprocess.run(
                    ["squeue", "-h", "-o", "%i"], env=self.env, capture_output=True, text=True, timeout=15
                )
                if r.returncode != 0 or not r.stdout.strip():
                    break
                time.sleep(0.5)
            subprocess.run(["scontrol", "shutdown"], env=self.env, capture_output=True, timeout=15)
            for pidfile in ("slurmctld.pid", "slurmd.pid"):
                self._wait_gone(self.workdir / "run" / pidfile, 20)
        if self._started_munged:
            subprocess.run(
                ["runuser", "-u", "munge", "--", MUNGED, "--stop", f"--socket={self.munge_socket}"],
                capture_output=True,
                timeout=20,
            )
            self._started_munged = False
        if self.munge_dir is not None:
            shutil.rmtree(self.munge_dir, ignore_errors=True)
            self.munge_dir = None

    @staticmethod
    def _wait_gone(pidfile: Path, timeout: float) -> None:
        try:
            pid = int(pidfile.read_text().strip())
        except (OSError, ValueError):
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
        try:  # a daemon that ignores the shutdown request: it is ours (its pid file is in our tree)
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    # -- jobs --------------------------------------------------------------------------------
    def run(self, *args: str, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("env", self.env)
        return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, **kw)

    def sbatch(self, *args: str, env: dict | None = None, cwd: str | os.PathLike | None = None) -> int:
        """Submit; ``env`` adds to the cluster's environment, a ``None`` value removes the variable."""
        merged = {k: v for k, v in {**self.env, **(env or {})}.items() if v is not None}
        r = self.run("sbatch", "--parsable", *args, env=merged, cwd=cwd)
        if r.returncode != 0:
            raise RuntimeError(f"sbatch failed: {r.stderr.strip()}")
        return int(r.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...); {} once it is gone."""
        r = self.run("scontrol", "-o", "show", "job", str(job_id))
        if r.returncode != 0:
            return {}
        return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", r.stdout))

    def wait(self, job_id: int, until, timeout: float, poll: float = 0.5) -> dict[str, str]:
        """Poll the job until ``until(info)`` is true; raise TimeoutError (with the logs) if it never is."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if until(info):
                return info
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} not done in {timeout:.0f} s: {info}\n{self.log_tail()}")

    def wait_final(self, job_id: int, timeout: float) -> dict[str, str]:
        return self.wait(job_id, lambda i: i.get("JobState") in FINAL_STATES, timeout)

    def log_tail(self, n: int = 30) -> str:
        out = []
        for name in ("slurmctld.log", "slurmd.log"):
            p = self.workdir / "log" / name
            if p.exists():
                out.append(f"--- {name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-n:]))
        return "\n".join(out)


def slurm_or_skip(workdir: str | os.PathLike, **kw):
    """Enter a :class:`SlurmCluster`, or skip the test with the reason (fail instead when ``CI=true``)."""
    import pytest

    cluster = SlurmCluster(workdir, **kw)
    try:
        return cluster.__enter__()
    except SlurmUnavailable as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"slurm is required on CI but cannot start: {e}")
        pytest.skip(reason=f"slurm cannot start here: {e}")
