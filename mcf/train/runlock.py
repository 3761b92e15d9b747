"""One run per output folder: a lock file that works on shared file systems across nodes.

``OUTPUT/.mcf.lock`` is created with ``O_CREAT | O_EXCL`` (atomic on local file systems, NFSv3+,
Lustre and GPFS, where ``flock`` may not reach other nodes) and holds JSON: host, pid, the pid's
start time (kernel ticks since boot), the machine's boot id, its pid namespace, the start time (UTC),
a random token and the slurm job id and restart count. Rank 0 takes it before anything is written
to the folder and removes it on every exit path it survives; a thread refreshes its mtime (the
heartbeat) every ``stale_s / 8`` seconds.

A lock found in place is *stale*, and taken over with a warning, when:

* it was written on this machine (same host name, boot id and pid namespace) and its process is
  gone, a zombie, or another process reusing the pid (different start time) — decided at once;
* it names this host but another boot id: the machine rebooted since;
* otherwise (another node, or another container): its heartbeat is older than ``stale_s``. Ages are
  measured in the file system's clock (the mtime of a file touched just before), never by comparing
  two nodes' clocks;
* it cannot be parsed and is older than ``stale_s``.

Taking over happens under a second lock (``.mcf.lock.break``, the same O_EXCL rule) after
re-reading the lock, so two runs that both found it stale cannot both win. A live lock refuses the
second run at once with :class:`~mcf.errors.RunLockedError` naming the holder — except an earlier
instance of the same slurm job (a requeue): then the new one waits up to ``stale_s`` for the old
one to exit or go silent (a node that failed), and refuses if it is still running after that.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from stat import S_ISREG
from typing import Any

from mcf.errors import RunLockedError, StorageError

log = logging.getLogger(__name__)

LOCK_NAME = ".mcf.lock"
READ_RETRIES = 20  # a lock read while its creator is still writing it: retried for ~1 s


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of a live process; None when there is none."""
    text = _read_text(f"/proc/{pid}/stat")
    if not text or ")" not in text:
        return None
    fields = text.rsplit(")", 1)[1].split()  # fields 3.. of proc(5): state is [0], starttime (22) is [19]
    return fields[0], int(fields[19])


def _slurm() -> tuple[str | None, int]:
    return os.environ.get("SLURM_JOB_ID"), int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


@dataclass
class Holder:
    """What a lock file says about the run that holds it."""

    host: str
    pid: int
    proc_start: int | None
    boot_id: str
    pidns: str
    started: str
    token: str
    slurm_job: str | None = None
    slurm_restart: int = 0

    @classmethod
    def me(cls) -> Holder:
        stat = _proc_stat(os.getpid())
        job, restart = _slurm()
        try:
            pidns = os.readlink("/proc/self/ns/pid")
        except OSError:
            pidns = ""
        return cls(host=socket.gethostname(), pid=os.getpid(), proc_start=stat[1] if stat else None,
                   boot_id=_read_text("/proc/sys/kernel/random/boot_id"), pidns=pidns,
                   started=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"), token=secrets.token_hex(8),
                   slurm_job=job, slurm_restart=restart)

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        try:
            d = json.loads(text)
            return cls(
                host=str(d["host"]), pid=int(d["pid"]), proc_start=d.get("proc_start"),
                boot_id=str(d.get("boot_id", "")), pidns=str(d.get("pidns", "")), started=str(d.get("started", "?")),
                token=str(d["token"]), slurm_job=d.get("slurm_job"), slurm_restart=int(d.get("slurm_restart") or 0),
            )
        except (ValueError, KeyError, TypeError, RecursionError):  # RecursionError: nested brackets ("[[[[...")
            return None

    def describe(self) -> str:
        job = f", slurm job {self.slurm_job} (restart {self.slurm_restart})" if self.slurm_job else ""
        return f"pid {self.pid} on host {self.host}, started {self.started}{job}"


class RunLock:
    """``RunLock(folder, stale_s).acquire()`` … ``release()`` (or a ``with`` block)."""

    def __init__(self, folder: str | os.PathLike, stale_s: float = 120.0) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.stale_s = float(stale_s)
        self.heartbeat_s = max(0.2, self.stale_s / 8)
        self.me = Holder.me()
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- public -----------------------------------------------------------------------------------
    def acquire(self) -> RunLock:
        """Take the lock or raise :class:`RunLockedError` (:class:`StorageError` if the folder is unusable)."""
        self._make_folder()
        waited_since = None
        while True:
            if self._create(self.path, self.me):
                break
            holder, age, ident = self._inspect(self.path)
            if ident is None:
                continue  # released between our create and our look: try again
            reason = self._stale(holder, age)
            if reason is not None:
                log.warning("output folder %s: taking over the lock of %s: %s", self.folder,
                            holder.describe() if holder else "an unreadable lock file", reason)
                self._break(ident)
                continue
            if holder is not None and self._earlier_instance_of_my_job(holder):
                if waited_since is None:
                    waited_since = time.monotonic()
                    log.warning("output folder %s is held by an earlier instance of this slurm job (%s): waiting up to "
                                "%.0f s for it to exit", self.folder, holder.describe(), self.stale_s)
                if time.monotonic() - waited_since < self.stale_s + 2 * self.heartbeat_s:
                    time.sleep(self.heartbeat_s)
                    continue
            raise RunLockedError(self._refusal(holder, age))
        self._thread = threading.Thread(target=self._heartbeat, name="mcf-run-lock", daemon=True)
        self._thread.start()
        log.info("output folder %s locked (%s)", self.folder, self.path)
        return self

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        holder, _, _ = self._inspect(self.path, retries=1, age=False)
        if holder is not None and holder.token == self.me.token:
            try:
                self.path.unlink()
            except OSError as e:
                log.warning("could not remove the lock %s: %s", self.path, e)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    # -- internals --------------------------------------------------------------------------------
    def _make_folder(self) -> None:
        if self.folder.exists() and not self.folder.is_dir():
            raise StorageError(f"output folder {self.folder} is a file: pass a folder to --output-dir")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"cannot create output folder {self.folder}: {e.strerror}") from None

    def _create(self, path: Path, holder: Holder) -> bool:
        """Create ``path`` holding ``holder`` atomically; False when it exists already."""
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)  # the umask decides, as for open()
        except FileExistsError:
            return False
        except OSError as e:
            raise StorageError(
                f"cannot write to output folder {self.folder} (creating {path.name}): {e.strerror}"
            ) from None
        try:
            os.write(fd, (json.dumps(asdict(holder)) + "\n").encode())
            os.fsync(fd)
        except OSError as e:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise StorageError(f"cannot write {path}: {e.strerror}") from None
        os.close(fd)
        return True

    def _fs_now(self) -> float:
        """The file system's current time: the mtime of a file touched now (node clocks may differ)."""
        probe = self.folder / f"{LOCK_NAME}.clock.{self.me.host}.{self.me.pid}"
        try:
            fd = os.open(probe, os.O_CREAT | os.O_WRONLY, 0o666)
            try:
                os.utime(fd)
                return os.fstat(fd).st_mtime
            finally:
                os.close(fd)
                probe.unlink(missing_ok=True)
        except OSError:
            return time.time()

    def _inspect(
        self, path: Path, retries: int = READ_RETRIES, age: bool = True
    ) -> tuple[Holder | None, float | None, tuple | None]:
        """(holder or None if unreadable, age of its heartbeat in s (with ``age``), identity (inode,
        mtime)); identity None when the file does not exist. Opened before stat, so NFS revalidates
        the attributes."""
        for attempt in range(retries):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO in its place must not block
            except FileNotFoundError:
                return None, None, None
            except OSError:
                return None, None, ("unreadable",)
            try:
                st = os.fstat(fd)
                if not S_ISREG(st.st_mode):
                    raise StorageError(
                        f"{path} is not a file (a folder, a FIFO, ...): mcf's run lock goes there; move it away"
                    )
                text = os.read(fd, 1 << 16).decode(errors="replace")
            finally:
                os.close(fd)
            holder = Holder.parse(text)
            if holder is not None or attempt == retries - 1:
                # the heartbeat's age; negative: its mtime lies in the future (a clock set wrong, a touch -d)
                return holder, self._fs_now() - st.st_mtime if age else None, (st.st_ino, st.st_mtime_ns)
            time.sleep(0.05)  # being written by its creator right now
        return None, None, None

    def _same_machine(self, h: Holder) -> bool:
        return h.host == self.me.host and h.boot_id == self.me.boot_id and h.pidns == self.me.pidns

    def _stale(self, h: Holder | None, age: float | None) -> str | None:
        """Why the lock is stale, or None when its holder may be alive."""
        if h is None:
            return f"it is unreadable and {age:.0f} s old" if age is not None and age > self.stale_s else None
        if self._same_machine(h):
            stat = _proc_stat(h.pid)
            if stat is None or stat[0] == "Z":
                return f"process {h.pid} is gone"
            if h.proc_start is not None and stat[1] != h.proc_start:
                return f"pid {h.pid} now belongs to another process"
            return None
        if h.host == self.me.host and h.boot_id and h.boot_id != self.me.boot_id and h.pidns == self.me.pidns:
            return "the machine has rebooted since"
        if age is not None and age > self.stale_s:
            return f"no heartbeat for {age:.0f} s (stale after {self.stale_s:.0f} s)"
        return None

    def _earlier_instance_of_my_job(self, h: Holder) -> bool:
        return (
            self.me.slurm_job is not None
            and h.slurm_job == self.me.slurm_job
            and h.slurm_restart < self.me.slurm_restart
        )

    def _break(self, ident: tuple) -> None:
        """Remove the stale lock seen as ``ident``, under the break lock so only one run does it."""
        breaker = self.folder / (LOCK_NAME + ".break")
        if not self._create(breaker, self.me):
            other, age, _ = self._inspect(breaker, retries=1)
            if age is not None and age > self.stale_s:  # a run died while breaking
                breaker.unlink(missing_ok=True)
            else:
                time.sleep(self.heartbeat_s / 4)
            return
        try:
            _, _, now = self._inspect(self.path, retries=1, age=False)
            if now == ident:  # still the lock we judged stale, not a fresh one of a faster run
                self.path.unlink(missing_ok=True)
        finally:
            breaker.unlink(missing_ok=True)

    def _refusal(self, h: Holder | None, age: float | None) -> str:
        who = h.describe() if h is not None else "its lock file cannot be read (being written, or damaged)"
        if age is not None and age < -self.heartbeat_s:  # no heartbeat writes a future time: it can never age
            return (f"output folder {self.folder} is locked by {who} (lock {self.path}), whose heartbeat time lies "
                    f"{-age:.0f} s in the future (a clock set wrong): it will not go stale by itself; if no run uses "
                    f"this folder, delete {self.path}, else use another --output-dir")
        beat = f", heartbeat {age:.0f} s ago" if age is not None else ""
        return (
            f"output folder {self.folder} is in use by another run: {who} (lock {self.path}{beat}); wait for it "
            "to finish or use another --output-dir (the lock of a run that died is taken over automatically: at once "
            f"on the same machine, after {self.stale_s:.0f} s without heartbeat from another one)"
        )

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            holder, _, _ = self._inspect(self.path, retries=3, age=False)
            if holder is None or holder.token != self.me.token:
                if not self.lost:
                    self.lost = True
                    log.error("the lock %s is no longer this run's (%s): another run may now write to %s", self.path,
                              holder.describe() if holder else "removed", self.folder)
                continue
            try:
                os.utime(self.path)
            except OSError as e:
                log.warning("could not refresh the lock %s: %s", self.path, e)
