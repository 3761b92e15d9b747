"""Run outputs on rank 0: ``metrics.jsonl``, MLflow (params, metrics, pictures, final checkpoint),
and reconstruction pictures (original | masked | rebuilt).

MLflow's URI is ``logging.tracking_uri`` (``--tracking-uri``: a server ``http://…``, any MLflow URI,
or ``none``), else ``$MLFLOW_TRACKING_URI``, else a local sqlite store in the output folder (no
server); the experiment ``logging.experiment``, else ``$MLFLOW_EXPERIMENT_NAME``, else ``mcf``
(:func:`~mcf.train.tracking.resolve_tracking`). A local store keeps its artifacts (the pictures) in
``mlartifacts/`` beside its database, so the default run folder is complete on its own, and a copied
or moved folder is re-pointed at its own artifacts when mcf next opens it. On resume
the same MLflow run continues (its id is kept in ``OUTPUT/mlflow_run_id``) and ``metrics.jsonl`` is
cut back to the resumed step. An unreachable server at start is a one-line error; after that MLflow
is fed by a background thread that rides out outages (:mod:`mcf.train.tracking`), and
``metrics.jsonl`` is always complete. A failed write of ``metrics.jsonl`` (a full disk) is a
one-line :class:`~mcf.errors.StorageError`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mcf.configtree import to_dict
from mcf.errors import StorageError, TrackingError
from mcf.losses.pixel import unpatchify
from mcf.train.integrity import describe_write_error
from mcf.train.tracking import (
    TRACKING_URI_ENV,
    MlflowSink,
    Tracking,
    bound_http_retries,
    check_reachable,
    resolve_tracking,
)

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
RUN_ID_FILE = "mlflow_run_id"
ARTIFACT_DIR = "mlartifacts"  # MLflow artifacts of the local store (pictures), inside the run folder
# the loader's normalisation (mcf.data.core.transforms), undone for pictures
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def read_metrics(output_dir: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def local_artifact_root(uri: str) -> Path | None:
    """Where a local store keeps its artifacts: ``mlartifacts/`` next to its sqlite file, so a run
    folder with the default store (``OUTPUT/mlflow.db``) holds its pictures too. None for a server
    (it decides). MLflow itself would put them under ``./mlruns`` of the current directory."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///"):])
    return db.parent.resolve() / ARTIFACT_DIR


# (table, column) of MLflow's sqlite schema holding absolute artifact locations (MLflow 2.x and 3.x)
_LOCATION_COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                     ("logged_models", "artifact_location"))


def repoint_local_store(db: Path) -> int:
    """Make a run folder's own store point at its own ``mlartifacts/`` again after the folder was
    copied or moved: MLflow stores absolute artifact locations, so a copy would otherwise list the
    original's pictures (none once it is deleted) and a resumed copy would write into the original.

    Every location ending in ``/mlartifacts`` (mcf's layout) that is not this folder's is rewritten,
    with everything below it. Returns the number of rows changed (0 for a store that never moved).
    """
    import sqlite3

    if not db.is_file() or db.stat().st_size == 0:
        return 0
    new_root = (db.parent.resolve() / ARTIFACT_DIR).as_uri()
    con = sqlite3.connect(db, timeout=30)
    try:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "experiments" not in tables:
            return 0
        old_roots = {loc for (loc,) in con.execute("SELECT artifact_location FROM experiments")
                     if loc and loc.rstrip("/").endswith("/" + ARTIFACT_DIR) and loc.rstrip("/") != new_root}
        changed = 0
        with con:
            for old in old_roots:
                old = old.rstrip("/")
                for table, column in _LOCATION_COLUMNS:
                    if table in tables:
                        changed += con.execute(
                            f"UPDATE {table} SET {column} = ? || substr({column}, ?) "  # noqa: S608 - fixed names
                            f"WHERE {column} = ? OR substr({column}, 1, ?) = ?",
                            (new_root, len(old) + 1, old, len(old) + 1, old + "/")).rowcount
        if old_roots:
            log.info("MLflow store %s was moved or copied: its artifact locations now point at %s (were %s)", db,
                     new_root, ", ".join(sorted(old_roots)))
        return changed
    except sqlite3.Error as e:
        raise StorageError(f"cannot update the MLflow store {db} after it moved ({e})") from None
    finally:
        con.close()


def _ensure_experiment(mlflow: Any, name: str, artifact_root: Path | None) -> None:
    """Select experiment ``name``, creating it with ``artifact_root`` (a local store) when new."""
    exp = mlflow.get_experiment_by_name(name)
    if exp is None and artifact_root is not None:
        mlflow.create_experiment(name, artifact_location=artifact_root.as_uri())
    elif exp is not None and artifact_root is not None and exp.artifact_location != artifact_root.as_uri():
        log.warning("MLflow experiment '%s' keeps its artifacts at %s, not in this store's folder (%s): the "
                    "experiment was made elsewhere; new pictures go there", name, exp.artifact_location, artifact_root)
    mlflow.set_experiment(name)


def _known_run(uri: str, run_id: str) -> bool:
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(uri).get_run(run_id)
    except Exception:  # noqa: BLE001 - RESOURCE_DOES_NOT_EXIST, or a store that cannot say
        return False
    return True


def start_mlflow(tracking: Tracking, *, run_name: str, run_id: str | None = None, params: dict[str, Any] | None = None,
                 system_metrics: bool = True) -> MlflowSink:
    """Start (or, with ``run_id``, continue) an MLflow run; every mcf command that tracks starts here.

    ``tracking`` comes from :func:`~mcf.train.tracking.resolve_tracking` (its ``uri`` must not be
    None). The run folder's own store (``tracking.local_db``) is created with the umask's mode, not
    sqlite's 0644, keeps its artifacts in ``mlartifacts/`` beside it, and is re-pointed there if the
    folder was copied or moved (:func:`repoint_local_store`). A server must answer within seconds
    (:func:`~mcf.train.tracking.check_reachable`), MLflow's HTTP retries are bounded, ``params``
    (nested) are logged flattened, ``system_metrics`` asks MLflow to sample CPU/GPU use and memory
    (its "System metrics" tab; needs psutil, and pynvml for GPUs), and the run is then fed by a
    background :class:`MlflowSink`. A ``run_id`` this store does not know (the URI changed since)
    starts a new run, with a warning.

    Raises:
        TrackingError: an unreachable server, or one that fails at start (one line naming the URI).
        StorageError: the local store cannot be created.
    """
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = tracking.uri
    if uri is None:
        raise ValueError("start_mlflow needs a tracking URI (resolve_tracking gave None: MLflow is off)")
    if tracking.local_db is not None:
        db = tracking.local_db
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
            db.touch(mode=0o666)
        except OSError as e:
            raise StorageError(describe_write_error(db, e)) from None
        repoint_local_store(db)
    check_reachable(uri)
    bound_http_retries()
    import mlflow

    try:
        with _environment_kept(TRACKING_URI_ENV, "MLFLOW_EXPERIMENT_ID"):
            mlflow.set_tracking_uri(uri)
        if run_id is not None and not _known_run(uri, run_id):
            log.warning("MLflow run %s (from %s) is not in %s: the tracking URI changed since; starting a new run",
                        run_id, RUN_ID_FILE, uri)
            run_id = None
        with _environment_kept(TRACKING_URI_ENV, "MLFLOW_EXPERIMENT_ID"):
            _ensure_experiment(mlflow, tracking.experiment, local_artifact_root(uri))
        run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name,
                               log_system_metrics=system_metrics and _has_psutil())
        if params is not None and run_id is None:
            log_params(mlflow, params)
    except Exception as e:  # noqa: BLE001 - MlflowException, requests' errors: a server that answers badly
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        try:
            mlflow.end_run(status="FAILED")  # a run started before the failure stays no one's active run
        except Exception:  # noqa: BLE001, S110 - the server that just failed may fail this too
            pass
        raise TrackingError(
            f"MLflow tracking at {uri} failed at start ({first}); fix it or pass --tracking-uri none"
        ) from None
    log.info("MLflow: %s, experiment '%s', run %s (%s)", uri, tracking.experiment, run.info.run_id, tracking.rule)
    return MlflowSink(mlflow, run.info.run_id, uri)


@contextlib.contextmanager
def _environment_kept(*names: str) -> Iterator[None]:
    """Undo what the block writes to ``os.environ[name]``: ``mlflow.set_tracking_uri`` exports the URI as
    ``$MLFLOW_TRACKING_URI`` and ``mlflow.set_experiment`` its id as ``$MLFLOW_EXPERIMENT_ID`` (MLflow >= 2.x),
    which would make this run's store the default of every later command in the process and of every
    process it starts (a fine-tuning after a pretraining in one notebook, a launcher's children)."""
    before = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def log_params(mlflow: Any, params: dict[str, Any]) -> None:
    """Log nested ``params`` flattened (values cut to 500 characters), 100 per request (MLflow's limit)."""
    flat = {k: str(v)[:500] for k, v in flatten(params).items()}
    keys = sorted(flat)
    for i in range(0, len(keys), 100):
        mlflow.log_params({k: flat[k] for k in keys[i:i + 100]})


def _has_psutil() -> bool:
    try:
        import psutil  # noqa: F401 - MLflow's system metrics read it
    except ImportError:
        log.warning("psutil is not installed: MLflow's system metrics (CPU, memory) are off; pip install psutil")
        return False
    return True


def ui_command(uri: str) -> str:
    """The shell command that opens ``uri`` in the MLflow UI (a server's URI is opened in a browser)."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri}"


class RunLogger:
    """Rank 0's sink for metrics; on other ranks every method is a no-op."""

    def __init__(self, cfg: Any, output_dir: Path, rank: int, resume_step: int | None):
        self.enabled = rank == 0
        self.output_dir = output_dir
        self.mlflow = None
        self.tracking: Tracking | None = None
        self.resumed_run = False
        if not self.enabled:
            return
        path = self.metrics_path = output_dir / METRICS_FILE
        try:
            if resume_step is not None:  # drop what the interrupted run logged after its checkpoint
                kept = [r for r in read_metrics(output_dir) if r.get("step", 0) <= resume_step]
                path.write_text("".join(json.dumps(r) + "\n" for r in kept))
            elif path.exists():
                path.unlink()
            self._file = open(path, "a")
        except OSError as e:
            raise StorageError(describe_write_error(path, e)) from None
        self.tracking = resolve_tracking(cfg.logging.tracking_uri, output_dir, cfg.logging.experiment, "mcf")
        if self.tracking.uri is None:
            log.info("MLflow is off (%s); metrics go to %s only", self.tracking.rule, path)
            return
        id_file = output_dir / RUN_ID_FILE
        run_id = id_file.read_text().strip() if resume_step is not None and id_file.is_file() else None
        self.mlflow = start_mlflow(self.tracking, run_name=output_dir.name, run_id=run_id, params=to_dict(cfg),
                                   system_metrics=cfg.logging.system_metrics)
        self.resumed_run = run_id == self.mlflow.run_id
        try:
            id_file.write_text(self.mlflow.run_id + "\n")
        except OSError as e:
            raise StorageError(describe_write_error(id_file, e)) from None

    def log_params(self, params: dict[str, Any]) -> None:
        """Constants of the run (FLOPs per image, the device's peak), logged once as MLflow params
        when the run is new (a resumed run keeps the values it logged first)."""
        if self.enabled and self.mlflow is not None and not self.resumed_run:
            self.mlflow.log_params({k: str(v)[:500] for k, v in params.items()})

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as e:
            raise StorageError(describe_write_error(self.metrics_path, e)) from None
        if self.mlflow is not None:
            step = int(record["step"])
            self.mlflow.log_metrics(
                {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float))}, step=step
            )

    def log_artifact(self, path: Path, folder: str) -> None:
        if self.enabled and self.mlflow is not None:
            self.mlflow.log_artifact(str(path), folder)

    def set_tag(self, key: str, value: str) -> None:
        if self.enabled and self.mlflow is not None:
            self.mlflow.set_tag(key, value)

    def close(self, status: str = "FINISHED") -> None:
        if not self.enabled:
            return
        try:
            self._file.close()
        except OSError as e:  # the disk filled up: the error that stopped the run already said so
            log.warning("%s", describe_write_error(self.metrics_path, e))
        if self.mlflow is not None:
            self.mlflow.end_run(status=status)
            self.mlflow = None


def reconstruction_grid(images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: int) -> np.ndarray:
    """Rows of original | masked | rebuilt, uint8 ``[rows·H, 3·W, 3]``.

    ``images``: ``[N, 3, H, W]`` normalised; ``pred``: ``[N, L, p·p·3]``; ``mask``: ``[N, L]`` (1 = removed).
    """
    images, pred, mask = images.detach().float().cpu(), pred.detach().float().cpu(), mask.detach().float().cpu()
    N, _, H, W = images.shape
    rebuilt = unpatchify(pred, patch_size)  # (N, 3, H, W)
    h = H // patch_size
    m = mask.reshape(N, 1, h, h).repeat_interleave(patch_size, 2).repeat_interleave(patch_size, 3)  # (N, 1, H, W)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    original = images * std + mean
    masked = original * (1 - m) + 0.5 * m  # removed patches grey
    rebuilt = rebuilt * std + mean
    rows = torch.cat([original, masked, rebuilt], dim=3)  # (N, 3, H, 3W)
    grid = rows.permute(0, 2, 3, 1).reshape(N * H, 3 * W, 3)
    return (grid.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def save_reconstruction(
    path: Path, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: int, scale: int = 1
) -> Path:
    from PIL import Image

    grid = reconstruction_grid(images, pred, mask, patch_size)
    img = Image.fromarray(grid)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path)
    except OSError as e:
        raise StorageError(describe_write_error(path, e)) from None
    return path
