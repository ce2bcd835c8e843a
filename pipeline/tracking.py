"""MLflow plumbing: where runs go, and logging that never takes a training run down.

Train V2 rejects Ray's ``MLflowLoggerCallback``, so rank 0 logs through an ``MlflowClient``
bound to an explicit run id (no global "active run" state inside Ray workers). The run id
travels in every checkpoint, so a restarted worker logs into the same run.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

log = logging.getLogger(__name__)


def resolve_tracking_uri(configured: str | None = None) -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else a SQLite file in the working directory
    (a database-backed store: the model registry needs one)."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def default_artifact_root(tracking_uri: str) -> str | None:
    """Local stores get an absolute artifact folder beside the database; servers choose their own."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri[len("sqlite:///") :]).parent / "mlartifacts").as_uri()
    return None


def get_or_create_experiment(client: MlflowClient, name: str) -> str:
    """Experiments are created up front, by the driver, with an absolute artifact location:
    concurrent creation from trials races."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        artifact_root = default_artifact_root(client.tracking_uri)
        location = f"{artifact_root}/{name}" if artifact_root else None
        return client.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:
        exp = client.get_experiment_by_name(name)  # created meanwhile by another process
        if exp is None:
            raise
        return exp.experiment_id


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)
    return out


class RunLogger:
    """Logs to one MLflow run by id; tracking failures are warned about, never raised.

    While the server is unreachable, metric batches queue in memory and calls are not retried for
    ``cooldown_s`` (a dead server must not stall every epoch on HTTP retries); the next successful
    call sends the backlog, so the run catches up with no gap.
    """

    def __init__(self, tracking_uri: str, run_id: str | None, cooldown_s: float = 60.0) -> None:
        # Fail fast inside training processes: MLflow's default retries back off for minutes.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id
        self.cooldown_s = cooldown_s
        self._backlog: list[dict] = []
        self._down_since: float | None = None

    def _send(self, **batch) -> None:
        if self.run_id is None:
            return
        self._backlog.append(batch)
        if self._down_since is not None and time.monotonic() - self._down_since < self.cooldown_s:
            return
        try:
            while self._backlog:
                self.client.log_batch(self.run_id, **self._backlog[0])
                self._backlog.pop(0)
        except Exception as e:  # tracking must never crash training
            if self._down_since is None:
                log.warning("MLflow logging to run %s failed; training continues and %d batch(es) are queued "
                            "until the server answers: %s", self.run_id, len(self._backlog), e)
            self._down_since = time.monotonic()
            return
        if self._down_since is not None:
            log.warning("MLflow reachable again: run %s caught up", self.run_id)
            self._down_since = None

    def logged_steps(self, key: str) -> set[int]:
        """Steps of ``key`` already in the run (empty when unknown or unreachable)."""
        if self.run_id is None:
            return set()
        try:
            return {m.step for m in self.client.get_metric_history(self.run_id, key)}
        except Exception as e:
            log.warning("MLflow history of %s in run %s unavailable: %s", key, self.run_id, e)
            return set()

    @property
    def pending(self) -> int:
        return len(self._backlog)

    def metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self._send(metrics=[Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float))])

    def params(self, params: dict[str, Any]) -> None:
        self._send(params=[Param(k, v[:6000]) for k, v in flatten(params).items()])

    def tags(self, tags: dict[str, str]) -> None:
        self._send(tags=[RunTag(k, str(v)) for k, v in tags.items()])
