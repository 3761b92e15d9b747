"""MLflow that never stops training: a quick reachability check at start, a background sender after.

At start (rank 0), an ``http(s)://`` tracking URI must answer an HTTP request within
:data:`PROBE_TIMEOUT_S`; an unreachable server is a one-line error (exit 2) naming the URI and
``--tracking-uri none``, not minutes of retries. MLflow's own HTTP retries are bounded for this
process (``MLFLOW_HTTP_REQUEST_MAX_RETRIES=2``, ``..._BACKOFF_FACTOR=1``, ``..._TIMEOUT=20`` unless
already set in the environment).

Mid-run, metrics, tags and pictures go to a queue that a thread sends with ``MlflowClient`` calls.
When the server is away the thread warns once, keeps the queue (at most :data:`MAX_PENDING`
entries; newer ones are counted and dropped beyond) and retries every ``retry_s`` seconds; when the
server answers again it catches up in order. Training never waits on it; ``metrics.jsonl`` is
written before anything is queued, so it is complete whatever MLflow does. At the end, one last
attempt sends what is left; what cannot be sent is reported in one warning.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from mcf.errors import TrackingError

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 5.0
RETRY_S = 30.0
MAX_PENDING = 100_000
BATCH = 1000  # MLflow's limit of metrics per log_batch
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"  # MLflow's own variables, usually exported once for a cluster
EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"
LOCAL_STORE = "mlflow.db"  # the run folder's own store: sqlite, no server


@dataclass(frozen=True)
class Tracking:
    """Where a command's MLflow run goes: see :func:`resolve_tracking`."""

    uri: str | None
    """The tracking URI; None: MLflow is off."""
    experiment: str
    rule: str
    """Which rules chose ``uri`` and ``experiment``, for the log line."""
    local_db: Path | None = None
    """The sqlite file when ``uri`` is the run folder's own store (mcf creates it and owns its artifacts)."""


def resolve_tracking(explicit_uri: str | None, default_store: Path | None, explicit_experiment: str | None = None,
                     default_experiment: str = "mcf") -> Tracking:
    """MLflow's conventions, shared by ``mcf pretrain``, ``finetune`` and ``bench``.

    The URI: ``explicit_uri`` (``--tracking-uri``/``logging.tracking_uri``) first, then
    ``$MLFLOW_TRACKING_URI``, then ``sqlite:///DEFAULT_STORE/mlflow.db`` (the run folder's store);
    ``none`` from any of them turns MLflow off, and so does the lack of all three. The experiment:
    ``explicit_experiment``, then ``$MLFLOW_EXPERIMENT_NAME``, then ``default_experiment``.
    Nothing is created or contacted here.
    """
    env = os.environ
    if explicit_uri:
        uri, uri_rule = explicit_uri, "--tracking-uri"
    elif env.get(TRACKING_URI_ENV, "").strip():
        uri, uri_rule = env[TRACKING_URI_ENV].strip(), f"${TRACKING_URI_ENV}"
    elif default_store is not None:
        uri, uri_rule = None, "the run folder's store (no --tracking-uri, no $MLFLOW_TRACKING_URI)"
    else:
        uri, uri_rule = "none", "no --tracking-uri, no $MLFLOW_TRACKING_URI and no run folder"
    if explicit_experiment:
        experiment, exp_rule = explicit_experiment, "named in the config/flags"
    elif env.get(EXPERIMENT_ENV, "").strip():
        experiment, exp_rule = env[EXPERIMENT_ENV].strip(), f"${EXPERIMENT_ENV}"
    else:
        experiment, exp_rule = default_experiment, "the default"
    rule = f"URI from {uri_rule}, experiment {exp_rule}"
    if uri is not None and uri.lower() == "none":
        return Tracking(None, experiment, rule)
    local_db = None
    if uri is None:
        assert default_store is not None
        local_db = default_store.resolve() / LOCAL_STORE
        uri = f"sqlite:///{local_db}"
    return Tracking(uri, experiment, rule, local_db)


def bound_http_retries() -> None:
    """Bound MLflow's HTTP retries for this process (values already in the environment win)."""
    for key, value in HTTP_LIMITS.items():
        os.environ.setdefault(key, value)


def check_reachable(uri: str) -> None:
    """Raise :class:`TrackingError` when an http(s) tracking server does not answer an HTTP request
    within :data:`PROBE_TIMEOUT_S` (any HTTP status, even 401/404, counts as an answer)."""
    import ssl
    import urllib.error
    import urllib.request

    u = urlparse(uri)
    if u.scheme not in ("http", "https"):
        return  # sqlite:, file:, databricks ...: nothing to probe cheaply
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return  # it answered
    except urllib.error.URLError as e:
        if isinstance(e.reason, ssl.SSLError):
            return  # TLS is up; certificates are MLflow's business (MLFLOW_TRACKING_INSECURE_TLS ...)
        reason = e.reason.strerror if isinstance(e.reason, OSError) and e.reason.strerror else str(e.reason)
        raise TrackingError(_unreachable(uri, reason)) from None
    except (OSError, ValueError) as e:  # a timeout while reading, a reset connection, a malformed URI
        reason = (
            "timed out"
            if isinstance(e, socket.timeout)
            else (getattr(e, "strerror", None) or str(e) or type(e).__name__)
        )
        raise TrackingError(_unreachable(uri, reason)) from None


def _unreachable(uri: str, reason: str) -> str:
    return (
        f"MLflow tracking server {uri} is unreachable ({reason}); start it, fix the URI, or pass --tracking-uri none "
        "to train without MLflow"
    )


class MlflowSink:
    """The run's MLflow calls, sent by a background thread (the methods match ``mlflow``'s)."""

    def __init__(self, mlflow: Any, run_id: str, uri: str, retry_s: float = RETRY_S) -> None:
        from mlflow.tracking import MlflowClient

        self._mlflow, self.run_id, self.uri, self.retry_s = mlflow, run_id, uri, retry_s
        self._client = MlflowClient(uri)
        self._pending: deque[tuple[str, Any]] = deque()
        self._cond = threading.Condition()  # guards _pending; wakes the idle sender
        self._closing = False
        self._close_event = threading.Event()  # wakes the sender from a retry wait (new records do not)
        self.down = False
        self.dropped = 0
        # urllib3 logs every retry of every request as a warning: during an outage that is a line per
        # metric record; the one warning of this class says it all
        logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
        self._thread = threading.Thread(target=self._run, name="mcf-mlflow", daemon=True)
        self._thread.start()

    # -- the mlflow-like interface of RunLogger ----------------------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._put("metrics", [Metric(k, float(v), now, int(step)) for k, v in metrics.items()])

    def log_artifact(self, path: str, folder: str | None = None) -> None:
        self._put("artifact", (path, folder))

    def set_tag(self, key: str, value: str) -> None:
        self._put("tag", (key, value))

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        self._put("params", [Param(k, str(v)) for k, v in params.items()])

    def end_run(self, status: str = "FINISHED", timeout_s: float = 60.0) -> None:
        """Send what is pending (one last attempt if the server is away), then close the run."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._close_event.set()
        self._thread.join(timeout_s)
        left = len(self._pending)
        if left or self.dropped:
            log.warning(
                "MLflow %s: %d record(s) could not be sent (server unreachable)%s; metrics.jsonl has every metric",
                self.uri,
                left,
                f", {self.dropped} dropped from a full queue" if self.dropped else "",
            )
        try:
            self._mlflow.end_run(status=status)
        except Exception as e:  # noqa: BLE001 - the server is away: the run's status stays RUNNING there
            log.warning("MLflow %s: could not mark run %s %s (%s)", self.uri, self.run_id, status, _first_line(e))

    # -- the sender -------------------------------------------------------------------------------
    def _put(self, kind: str, payload: Any) -> None:
        with self._cond:
            if len(self._pending) >= MAX_PENDING:  # a long outage: keep the oldest, count the rest
                self.dropped += 1
                return
            self._pending.append((kind, payload))
            self._cond.notify()

    def _take(self) -> tuple[str, Any, int]:
        """The next request: consecutive metric records merged up to BATCH metrics; (kind, payload, items)."""
        kind, payload = self._pending[0]
        if kind != "metrics":
            return kind, payload, 1
        metrics, n = [], 0
        for k, p in self._pending:
            if k != "metrics" or (metrics and len(metrics) + len(p) > BATCH):
                break
            metrics += p
            n += 1
        return kind, metrics, n

    def _send(self, kind: str, payload: Any) -> None:
        if kind == "metrics":
            self._client.log_batch(self.run_id, metrics=payload, synchronous=True)
        elif kind == "params":
            self._client.log_batch(self.run_id, params=payload, synchronous=True)
        elif kind == "artifact":
            self._client.log_artifact(self.run_id, payload[0], payload[1])
        else:
            self._client.set_tag(self.run_id, *payload)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if not self._pending:
                    return
                kind, payload, n = self._take()
            try:
                self._send(kind, payload)
            except Exception as e:  # noqa: BLE001 - any failure of the server or the network
                if not self.down:
                    log.warning("MLflow %s is not answering (%s): training goes on, metrics.jsonl stays complete, and "
                                "MLflow will catch up when it is back (retried every %.0f s)", self.uri, _first_line(e),
                                self.retry_s)
                self.down = True
                if self._closing:
                    return  # the last attempt failed: end_run reports what is left
                self._close_event.wait(self.retry_s)
                continue
            with self._cond:
                for _ in range(n):
                    self._pending.popleft()
                caught_up = self.down and not self._pending
            if caught_up:
                self.down = False
                log.info("MLflow %s answers again: the buffered records are sent", self.uri)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]
