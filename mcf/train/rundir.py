"""What a run folder (``train.output_dir``) holds, and the rules for starting a run in one.

A run folder holds one run. ``--resume auto`` continues the run it holds. Starting *another* run in
it — ``--resume none``, or ``--resume PATH`` naming a checkpoint outside it — is refused while it
holds a run (a checkpoint folder or ``metrics.jsonl``), since the new run would replace the old one's
checkpoints, cut its ``metrics.jsonl`` and leave a later ``--resume auto`` to mix both. The explicit
choice is ``train.overwrite_run`` (``--overwrite-run``): the earlier run's files, exactly those mcf
writes there (:data:`RUN_FILES`, ``checkpoints/step_*``, ``reconstructions/step_*.png``,
``profile_step_*.json``), are deleted first; anything else in the folder is left alone, and the
MLflow store (``mlflow.db``, ``mlartifacts/``) keeps the earlier run as a run of its own.

The run folder must not lie inside the data (``--data``): its reconstructions (PNG files) would
become training images of the next start.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

from mcf.errors import ConfigError

log = logging.getLogger(__name__)

RUN_FILES = ("metrics.jsonl", "mlflow_run_id", "config.yaml")  # a run's own files at the top of its folder
_STEP_DIR = re.compile(r"^step_\d{8,}$")
_RECONSTRUCTION = re.compile(r"^step_\d{8,}\.png$")
_PROFILE = re.compile(r"^profile_step_\d+\.json$")


def _entries(folder: Path, pattern: re.Pattern[str]) -> list[Path]:
    try:
        return sorted(folder / e.name for e in os.scandir(folder) if pattern.match(e.name))
    except (FileNotFoundError, NotADirectoryError):
        return []


def earlier_run(out: Path) -> str | None:
    """What of a run ``out`` holds, in words (None when it holds none)."""
    steps = _entries(out / "checkpoints", _STEP_DIR)
    metrics = out / "metrics.jsonl"
    held = []
    if steps:
        held.append(f"{len(steps)} checkpoint folder(s) up to {steps[-1].name}")
    if metrics.is_file() and metrics.stat().st_size > 0:
        held.append("metrics.jsonl")
    return " and ".join(held) or None


def _inside(path: Path, folder: Path) -> bool:
    real, top = Path(os.path.realpath(path)), Path(os.path.realpath(folder))
    return real == top or top in real.parents


def check_start(out: Path, resume: str, overwrite: bool) -> None:
    """Rank 0, with the folder locked: refuse to start another run in ``out`` while it holds one,
    or (``overwrite``) delete the earlier run's files first.

    Raises:
        ConfigError: ``out`` holds a run, and this one neither continues it nor was told to overwrite it.
    """
    if resume == "auto" or (resume != "none" and _inside(Path(resume), out)):
        return  # continues the run in the folder
    held = earlier_run(out)
    if held is None:
        return
    if not overwrite:
        how = "--resume none" if resume == "none" else f"--resume {resume} (a checkpoint of another folder)"
        raise ConfigError(
            f"{out} holds another run ({held}); {how} would start a new run over it. Continue it with --resume auto, "
            "start in a new --output-dir, or pass --overwrite-run (train.overwrite_run=true) to delete that run's "
            "checkpoints and logs first")
    removed = clear_run(out)
    log.warning(
        "train.overwrite_run: deleted the earlier run in %s (%s; %d files and folders)", out, held, len(removed)
    )


def clear_run(out: Path) -> list[Path]:
    """Delete the files of the run in ``out`` that mcf writes (see the module docstring); returns them."""
    removed = [*_entries(out / "checkpoints", _STEP_DIR), *_entries(out / "reconstructions", _RECONSTRUCTION),
               *_entries(out, _PROFILE), *(out / name for name in RUN_FILES if (out / name).is_file())]
    for p in removed:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    return removed


def check_not_in_data(out: Path, data_path: str) -> None:
    """``out`` must not lie inside the data folder (its reconstructions would be read as training images).

    Raises:
        ConfigError: it does.
    """
    data = Path(data_path).expanduser()
    if data_path == "builtin" or not data.is_dir():
        return
    if _inside(out, data):
        raise ConfigError(f"the output dir {out} lies inside the data {data_path}: its reconstructions and checkpoints "
                          "would be read as data; choose an --output-dir outside it")
