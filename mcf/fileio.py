"""Files written the way a shared cluster expects: atomically, and with the permissions the umask gives.

Python's ``open`` creates files with mode ``0o666 & ~umask``; some writers do not (safetensors
creates ``0o600`` files, py-lmdb ``0o755`` ones, a temporary file from ``tempfile`` ``0o600``), and a
write-then-rename keeps the temporary file's mode. Everything mcf writes goes through
:func:`atomic_path` or gets :func:`file_mode`, so colleagues in the same group can read a run.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (``/proc/self/status``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no /proc: the classic read-by-setting (not atomic with other threads)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file: ``0o666 & ~umask``."""
    return 0o666 & ~current_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it becomes ``path`` (umask mode, fsynced,
    renamed over any old file), on an exception it is removed and ``path`` is left untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.chmod(tmp, file_mode())
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """``path.write_text(text)``, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def mcf_cache_dir() -> Path:
    """mcf's per-user cache: ``$MCF_CACHE``, else ``~/.cache/mcf`` (the built-in demo set, indexes of
    remote shards, the attention table's measured rows, ``mcf bench``'s default MLflow store)."""
    return Path(os.environ.get("MCF_CACHE") or Path.home() / ".cache" / "mcf").expanduser()
