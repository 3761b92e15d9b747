"""MLflow for ``mcf finetune``, on the same terms as ``mcf pretrain`` (:mod:`mcf.train.metrics`): a local
sqlite store ``OUTPUT/mlflow.db`` by default (no server) with its artifacts in ``OUTPUT/mlartifacts/``,
a server URI, or ``none`` to disable; rank 0 only; the resolved config as parameters, the train loss
per logged step, the test metrics (fractions and ``_percent``) at the last step, ``metrics.json`` and
the printed paper row as artifacts."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class FinetuneTracker:
    """No-op unless ``enabled`` and the URI is not ``none``."""

    def __init__(self, uri: str | None, experiment: str, output_dir: Path, run_name: str, enabled: bool):
        self.mlflow = None
        if not enabled or (uri is not None and uri.lower() == "none"):
            return
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        import mlflow

        from mcf.train.metrics import MLFLOW_DB, local_artifact_root

        output_dir.mkdir(parents=True, exist_ok=True)
        if uri is None:  # the default local store, created with the umask's mode (sqlite would make it 0644)
            db = output_dir.resolve() / MLFLOW_DB
            db.touch(mode=0o666)
            uri = f"sqlite:///{db}"
        mlflow.set_tracking_uri(uri)
        artifacts = local_artifact_root(uri)  # None for a server; else beside the database, not ./mlruns
        if artifacts is not None and mlflow.get_experiment_by_name(experiment) is None:
            mlflow.create_experiment(experiment, artifact_location=artifacts.as_uri())
        mlflow.set_experiment(experiment)
        run = mlflow.start_run(run_name=run_name)
        self.mlflow, self.run_id = mlflow, run.info.run_id
        log.info("MLflow: %s, run %s", uri, run.info.run_id)

    def log_params(self, params: dict[str, Any]) -> None:
        if self.mlflow is None:
            return
        from mcf.train.metrics import flatten

        flat = {k: str(v)[:500] for k, v in flatten(params).items()}
        keys = sorted(flat)
        for i in range(0, len(keys), 100):
            self.mlflow.log_params({k: flat[k] for k in keys[i : i + 100]})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.mlflow is not None:
            self.mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.mlflow is not None:
            self.mlflow.set_tags(tags)

    def log_artifact(self, path: Path) -> None:
        if self.mlflow is not None:
            self.mlflow.log_artifact(str(path))

    def close(self, status: str = "FINISHED") -> None:
        if self.mlflow is not None:
            self.mlflow.end_run(status=status)
            self.mlflow = None
