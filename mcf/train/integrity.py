"""Checkpoint integrity: every file a save writes is recorded, listed in the ``COMPLETE`` marker with
its size (and optionally its SHA-256), and checked against that list before a checkpoint is trusted.

Writing. :class:`CheckpointWriter` replaces the DeepSpeed engine's checkpoint engine for saves and
also writes mcf's own files: each file goes to ``NAME.tmp`` through a Python file object (so a full
disk is ``OSError(ENOSPC)``, not torch's ``unexpected pos``), is fsynced, then renamed. A write error
does not raise inside DeepSpeed (the other ranks would wait in its barriers): it is kept, later
writes are skipped, and the save reports it at the point where all ranks compare notes.

Marker (JSON, written by rank 0 after every rank reported its files)::

    {"format": "mcf-complete/2", "step": 8,
     "files": {"mp_rank_00_model_states.pt": {"size": 2618220, "sha256": "…"}, …}}

``sha256`` is present with ``checkpoint.hash=true`` (hashed while writing: no re-read; checking it
reads every file, so it costs a full read of the checkpoint on resume). Markers of older mcf
versions (the step number alone) stay readable: such a checkpoint is only content-scanned.

Checking (:func:`verify`, on one rank): the marker parses and names this step; every listed file is
a regular file (not a symbolic link) of the listed size (and hash); and no ``*.pt`` file in the
folder names a Python global outside :mod:`mcf.serialization`'s allowlist. Damage raises
:class:`~mcf.errors.CheckpointError`; code raises :class:`~mcf.errors.UnsafeCheckpointError`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from mcf.errors import CheckpointError, StorageError, UnsafeCheckpointError
from mcf.serialization import check_file, safe_load

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
MARKER_FORMAT = "mcf-complete/2"
MAX_MARKER_BYTES = 16 << 20  # a marker lists a few files per rank; anything larger is not one
SCAN_THREADS = 16  # files checked in parallel (latency of a shared file system, not CPU)
NO_SPACE_BYTES = 1 << 20  # a failed write with less free than this is reported as a full disk


# -- write errors ---------------------------------------------------------------------------------
def _free_bytes(path: Path) -> int | None:
    for p in (path, *path.parents):
        try:
            return shutil.disk_usage(p).free
        except OSError:
            continue
    return None


def describe_write_error(path: Path, e: BaseException) -> str:
    """One line for a failed write: a full disk says so, with the path and the free space there."""
    free = _free_bytes(path.parent)
    full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
    full = full or (isinstance(e, RuntimeError) and free is not None and free < NO_SPACE_BYTES)
    if full:
        where = f" ({free / 2**20:.1f} MiB free there)" if free is not None else ""
        return f"no space left on device writing {path}{where}"
    if isinstance(e, PermissionError):
        return f"cannot write {path}: permission denied"
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[0][:200]
    return f"cannot write {path}: {reason}"


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


class _HashingWriter:
    """A write-only file object that hashes what passes through (torch.save needs write and flush)."""

    def __init__(self, f: Any) -> None:
        self.f, self.sha = f, hashlib.sha256()

    def write(self, b: Any) -> int:
        self.sha.update(b)
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()


# -- writing --------------------------------------------------------------------------------------
class CheckpointWriter:
    """The DeepSpeed checkpoint engine of an mcf run, and the writer of mcf's own checkpoint files.

    DeepSpeed calls :meth:`save` / :meth:`load` (everything else goes to the engine it replaced);
    mcf calls :meth:`begin`, :meth:`write` and :meth:`report` around one save.
    """

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.begin()

    def __getattr__(self, name: str) -> Any:  # create/commit/makedirs/... of the replaced engine
        if name == "_inner":
            raise AttributeError(name)
        return getattr(self._inner, name)

    def begin(self, hash_files: bool = False) -> None:
        self.hash_files = hash_files
        self.files: dict[Path, dict[str, Any]] = {}
        self.error: str | None = None

    # DeepSpeed's CheckpointEngine interface
    def save(self, state_dict: Any, path: str) -> None:
        self.write(state_dict, Path(path))

    def load(self, path: str, map_location: Any = None) -> Any:
        return safe_load(path, map_location=map_location)

    def write(self, obj: Any, path: Path) -> None:
        """``torch.save`` to ``path`` (atomically, fsynced); a failure is kept for :meth:`report`."""
        if self.error is not None:
            return  # the save has failed already: write nothing more (the disk may be full)
        tmp = path.with_name(path.name + ".tmp")
        try:
            with open(tmp, "wb") as f:
                out = _HashingWriter(f) if self.hash_files else f
                torch.save(obj, out, _use_new_zipfile_serialization=getattr(self._inner, "zipfile_serialization", True))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            entry: dict[str, Any] = {"size": os.stat(path).st_size}
        except (OSError, RuntimeError) as e:
            self.error = describe_write_error(path, e)
            _unlink(tmp)
            return
        if self.hash_files:
            entry["sha256"] = out.sha.hexdigest()
        self.files[path] = entry

    def guard(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` with its write errors kept instead of raised (DeepSpeed's copy of its recovery scripts)."""

        def guarded(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except OSError as e:
                if self.error is None:
                    self.error = describe_write_error(Path(e.filename or "?"), e)
                return None

        return guarded

    def report(self, step_dir: Path) -> tuple[dict[str, dict[str, Any]], str | None]:
        """(files written into ``step_dir`` by this rank → size/hash, the first write error)."""
        files = {}
        for path, entry in self.files.items():
            if path.parent.resolve() == step_dir.resolve():
                files[path.name] = entry
        return files, self.error


def writer_of(engine: Any) -> CheckpointWriter:
    """The engine's :class:`CheckpointWriter`, installed on first use."""
    current = getattr(engine, "checkpoint_engine", None)
    if isinstance(current, CheckpointWriter):
        return current
    writer = CheckpointWriter(current)
    engine.checkpoint_engine = writer
    if hasattr(engine, "_copy_recovery_script"):  # rank 0 copies zero_to_fp32.py beside the checkpoints
        engine._copy_recovery_script = writer.guard(engine._copy_recovery_script)
    return writer


# -- marker ---------------------------------------------------------------------------------------
def write_marker(step_dir: Path, step: int, files: dict[str, dict[str, Any]]) -> None:
    """Write ``COMPLETE`` atomically (temp file, fsync, rename): the last file of a checkpoint."""
    body = json.dumps({"format": MARKER_FORMAT, "step": step, "files": dict(sorted(files.items()))}, indent=1)
    tmp = step_dir / (COMPLETE + ".tmp")
    try:
        with open(tmp, "w") as f:
            f.write(body + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, step_dir / COMPLETE)
    except OSError as e:
        _unlink(tmp)
        raise StorageError(describe_write_error(step_dir / COMPLETE, e)) from None


def read_marker(step_dir: Path) -> dict[str, Any] | None:
    """The marker's file list ``{name: {size[, sha256]}}``; None for an old marker (step number only).

    Raises:
        CheckpointError: no marker, or one that is damaged or names another step.
    """
    path = step_dir / COMPLETE
    try:
        st = path.lstat()
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{path} is not a regular file")
        if st.st_size > MAX_MARKER_BYTES:
            raise CheckpointError(f"{path} is damaged ({st.st_size} bytes: not a checkpoint marker)")
        text = path.read_text()
    except FileNotFoundError:
        raise CheckpointError(f"{step_dir} has no {COMPLETE} marker (its save was interrupted)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    step = _step_of(step_dir)
    if text.strip().isdigit():  # mcf-pretrain-v1 markers: the step alone
        if step is not None and int(text) != step:
            raise CheckpointError(f"{path} is damaged: it names step {int(text)}")
        return None
    try:
        data = json.loads(text)
        ok = isinstance(data, dict) and data.get("format") == MARKER_FORMAT and isinstance(data.get("files"), dict)
    except ValueError:
        ok = False
    if not ok:
        raise CheckpointError(
            f"{path} is damaged (not an mcf checkpoint marker): the save was cut short or the file was altered"
        )
    if step is not None and data.get("step") != step:
        raise CheckpointError(f"{path} is damaged: it names step {data.get('step')!r}, not {step}")
    for name, entry in data["files"].items():
        if not isinstance(name, str) or name != Path(name).name or name in ("", ".", "..") or "\0" in name:
            raise CheckpointError(f"{path} is damaged: it lists {name!r}, which is not a file of this folder")
        if not isinstance(entry, dict) or not isinstance(entry.get("size"), int) or entry["size"] < 0:
            raise CheckpointError(f"{path} is damaged: bad entry for {name}")
    return data["files"]


def _step_of(step_dir: Path) -> int | None:
    name = step_dir.name
    return int(name[5:]) if name.startswith("step_") and name[5:].isdigit() else None


# -- checking -------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _check_listed(step_dir: Path, name: str, entry: dict[str, Any]) -> None:
    path = step_dir / name
    try:
        st = path.lstat()
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing (listed in its {COMPLETE} marker)") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise CheckpointError(
            f"{path} is a symbolic link (to {os.readlink(path)}): checkpoint files must be regular files"
        )
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path} is not a regular file")
    if st.st_size != entry["size"]:
        raise CheckpointError(
            f"{path} is {st.st_size} bytes, its {COMPLETE} marker says {entry['size']} (cut short or replaced)"
        )
    if "sha256" in entry:
        try:
            digest = _sha256(path)
        except OSError as e:
            raise CheckpointError(f"cannot read {path}: {e.strerror}") from None
        if digest != entry["sha256"]:
            raise CheckpointError(f"{path} does not match the SHA-256 in its {COMPLETE} marker (damaged or replaced)")


def _scan(path: Path) -> None:
    try:
        st = path.lstat()
    except OSError:
        return  # gone: a listed file is reported by _check_listed, an unlisted one does not matter
    if stat.S_ISREG(st.st_mode):
        check_file(path)  # UnsafeCheckpointError when it names code; CheckpointError when unreadable


def verify(step_dir: Path) -> None:
    """Check a marked checkpoint before anything loads it (see the module docstring).

    Raises:
        UnsafeCheckpointError: a file names a type outside the allowlist (checked first: tampering
            is never mistaken for damage).
        CheckpointError: the marker or a file is missing, damaged, of the wrong size or hash.
    """
    listed = read_marker(step_dir)
    try:
        pts = sorted(p for p in step_dir.iterdir() if p.name.endswith(".pt"))
    except OSError as e:
        raise CheckpointError(f"cannot list {step_dir}: {e.strerror}") from None
    if not listed:  # an old marker (the step alone) or one listing nothing: the files every save writes must be there
        names = {p.name for p in pts}
        missing = sorted(set(_always_written(names)) - names)
        if missing:
            raise CheckpointError(f"{step_dir / missing[0]} is missing ({len(missing)} file(s) every checkpoint holds; "
                                  "its marker lists no files)")
    with ThreadPoolExecutor(SCAN_THREADS) as pool:
        scans = list(pool.map(_try, [lambda p=p: _scan(p) for p in pts]))
        unsafe = [e for e in scans if isinstance(e, UnsafeCheckpointError)]
        if unsafe:
            raise unsafe[0]
        if listed is not None:
            checks = list(
                pool.map(_try, [lambda n=n, e=e: _check_listed(step_dir, n, e) for n, e in sorted(listed.items())])
            )
            damaged = [e for e in checks if e is not None]
            if damaged:
                raise damaged[0]
    damaged = [e for e in scans if e is not None]
    if damaged:
        raise damaged[0]


_RANK_FILE = re.compile(r"^rank_(\d{5})\.pt$")
_OPTIM_SHARD = re.compile(r"^(.*zero_pp_rank_)(\d+)(_mp_rank_00_optim_states\.pt)$")


def _always_written(names: set[str]) -> list[str]:
    """The files a save of ``N`` ranks always writes, ``N`` taken from the rank files present: the run
    state, the module, one ``rank_*.pt`` per rank and, when the optimizer is sharded, one shard per rank."""
    shards = [m for x in names if (m := _OPTIM_SHARD.match(x))]
    ranks = [int(m.group(1)) for x in names if (m := _RANK_FILE.match(x))] + [int(m.group(2)) for m in shards]
    n = max(ranks, default=0) + 1
    out = ["mcf_state.pt", "mp_rank_00_model_states.pt", *(f"rank_{r:05d}.pt" for r in range(n))]
    if shards:
        head, tail = shards[0].group(1), shards[0].group(3)
        out += [f"{head}{r}{tail}" for r in range(n)]
    return out


def _try(fn: Callable[[], None]) -> CheckpointError | None:
    try:
        fn()
    except CheckpointError as e:
        return e
    return None
