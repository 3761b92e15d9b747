"""MLflow for ``mcf finetune``, on the same terms as ``mcf pretrain`` (:func:`mcf.train.metrics.start_mlflow`):
``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else a local sqlite store ``OUTPUT/mlflow.db`` (no
server) with its artifacts in ``OUTPUT/mlartifacts/``; a server must answer within seconds at start
(else one line, exit 2); ``none`` disables; the experiment ``--experiment``, else
``$MLFLOW_EXPERIMENT_NAME``, else ``mcf-finetune``; rank 0 only. The resolved config goes in as
parameters at start; the train loss per logged step, the test metrics (fractions and ``_percent``) at
the last step, ``metrics.json`` and the printed paper row are sent by a background thread, so a
server that goes away mid-run costs one warning, never the fine-tuning."""

from __future__ import annotations

from pathlib import Path
from typing import Any

DEFAULT_EXPERIMENT = "mcf-finetune"


def probe(uri: str | None, experiment: str | None, output_dir: Path) -> None:
    """Fail fast: an unreachable tracking server is one line (:class:`~mcf.errors.TrackingError`) within
    seconds, before data, model and DeepSpeed are built (the tracker itself starts after them)."""
    from mcf.train.tracking import check_reachable, resolve_tracking

    tracking = resolve_tracking(uri, output_dir, experiment, DEFAULT_EXPERIMENT)
    if tracking.uri is not None:
        check_reachable(tracking.uri)


class FinetuneTracker:
    """No-op unless ``enabled`` and the URI is not ``none``."""

    def __init__(self, uri: str | None, experiment: str | None, output_dir: Path, run_name: str, enabled: bool,
                 params: dict[str, Any] | None = None):
        self.sink = None
        if not enabled:
            return
        from mcf.train.metrics import start_mlflow
        from mcf.train.tracking import resolve_tracking

        tracking = resolve_tracking(uri, output_dir, experiment, DEFAULT_EXPERIMENT)
        if tracking.uri is None:
            return
        self.sink = start_mlflow(tracking, run_name=run_name, params=params)
        self.run_id = self.sink.run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.sink is not None:
            self.sink.log_metrics(metrics, step)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.sink is not None:
            for key, value in tags.items():
                self.sink.set_tag(key, str(value))

    def log_artifact(self, path: Path) -> None:
        if self.sink is not None:
            self.sink.log_artifact(str(path))

    def close(self, status: str = "FINISHED") -> None:
        if self.sink is not None:
            self.sink.end_run(status=status)
            self.sink = None
