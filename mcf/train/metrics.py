"""Run outputs on rank 0: ``metrics.jsonl``, MLflow (params, metrics, pictures, final checkpoint),
and reconstruction pictures (original | masked | rebuilt).

MLflow defaults to a local sqlite store in the output folder (no server); ``logging.tracking_uri``
names a server (``http://…``) or ``none``. A local store keeps its artifacts (the pictures) in
``mlartifacts/`` beside its database, so the default run folder is complete on its own. On resume
the same MLflow run continues (its id is kept in ``OUTPUT/mlflow_run_id``) and ``metrics.jsonl`` is
cut back to the resumed step. An unreachable server at start is a one-line error; after that MLflow
is fed by a background thread that rides out outages (:mod:`mcf.train.tracking`), and
``metrics.jsonl`` is always complete. A failed write of ``metrics.jsonl`` (a full disk) is a
one-line :class:`~mcf.errors.StorageError`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mcf.configtree import to_dict
from mcf.errors import StorageError, TrackingError
from mcf.losses.pixel import unpatchify
from mcf.train.integrity import describe_write_error
from mcf.train.tracking import MlflowSink, bound_http_retries, check_reachable

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
RUN_ID_FILE = "mlflow_run_id"
MLFLOW_DB = "mlflow.db"
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


def _ensure_experiment(mlflow: Any, name: str, artifact_root: Path | None) -> None:
    """Select experiment ``name``, creating it with ``artifact_root`` (a local store) when new."""
    exp = mlflow.get_experiment_by_name(name)
    if exp is None and artifact_root is not None:
        mlflow.create_experiment(name, artifact_location=artifact_root.as_uri())
    elif exp is not None and artifact_root is not None and exp.artifact_location != artifact_root.as_uri():
        log.warning("MLflow experiment '%s' keeps its artifacts at %s, not in this store's folder (%s): the run folder was "
                    "moved or the experiment was made elsewhere; new pictures go there", name, exp.artifact_location, artifact_root)
    mlflow.set_experiment(name)


def start_mlflow(uri: str | None, output_dir: Path, experiment: str, *, run_name: str, run_id: str | None = None,
                 params: dict[str, Any] | None = None) -> MlflowSink:
    """Start (or, with ``run_id``, continue) an MLflow run; every mcf command that tracks starts here.

    ``uri`` None is the default local store ``OUTPUT/mlflow.db`` (created with the umask's mode, not
    sqlite's 0644; its artifacts in ``OUTPUT/mlartifacts``). A server must answer within seconds
    (:func:`~mcf.train.tracking.check_reachable`), MLflow's HTTP retries are bounded, ``params``
    (nested) are logged flattened, and the run is then fed by a background :class:`MlflowSink`.

    Raises:
        TrackingError: an unreachable server, or one that fails at start (one line naming the URI).
        StorageError: the local store cannot be created.
    """
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if uri is None:
        db = output_dir.resolve() / MLFLOW_DB
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
            db.touch(mode=0o666)
        except OSError as e:
            raise StorageError(describe_write_error(db, e)) from None
        uri = f"sqlite:///{db}"
    check_reachable(uri)
    bound_http_retries()
    import mlflow

    try:
        mlflow.set_tracking_uri(uri)
        _ensure_experiment(mlflow, experiment, local_artifact_root(uri))
        run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name)
        if params is not None:
            flat = {k: str(v)[:500] for k, v in flatten(params).items()}
            keys = sorted(flat)
            for i in range(0, len(keys), 100):
                mlflow.log_params({k: flat[k] for k in keys[i:i + 100]})
    except Exception as e:  # noqa: BLE001 - MlflowException, requests' errors: a server that answers badly
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        try:
            mlflow.end_run(status="FAILED")  # a run started before the failure stays no one's active run
        except Exception:  # noqa: BLE001, S110 - the server that just failed may fail this too
            pass
        raise TrackingError(f"MLflow tracking at {uri} failed at start ({first}); fix it or pass --tracking-uri none") from None
    log.info("MLflow: %s, run %s", uri, run.info.run_id)
    return MlflowSink(mlflow, run.info.run_id, uri)


class RunLogger:
    """Rank 0's sink for metrics; on other ranks every method is a no-op."""

    def __init__(self, cfg: Any, output_dir: Path, rank: int, resume_step: int | None):
        self.enabled = rank == 0
        self.output_dir = output_dir
        self.mlflow = None
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
        uri = cfg.logging.tracking_uri
        if uri is not None and uri.lower() == "none":
            return
        id_file = output_dir / RUN_ID_FILE
        run_id = id_file.read_text().strip() if resume_step is not None and id_file.is_file() else None
        self.mlflow = start_mlflow(uri, output_dir, cfg.logging.experiment, run_name=output_dir.name, run_id=run_id,
                                   params=None if run_id else to_dict(cfg))
        try:
            id_file.write_text(self.mlflow.run_id + "\n")
        except OSError as e:
            raise StorageError(describe_write_error(id_file, e)) from None

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
            self.mlflow.log_metrics({k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float))}, step=step)

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


def save_reconstruction(path: Path, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: int, scale: int = 1) -> Path:
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
