"""MLflow plumbing: where runs go, and logging that never takes a training run down.

Train V2 rejects Ray's ``MLflowLoggerCallback``, so rank 0 logs through an ``MlflowClient``
bound to an explicit run id (no global "active run" state inside Ray workers). The run id
travels in every checkpoint, so a restarted worker logs into the same run.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
from mlflow.entities import Metric  # noqa: E402
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
    """Logs to one MLflow run by id; tracking failures are warned about, never raised."""

    def __init__(self, tracking_uri: str, run_id: str | None) -> None:
        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id
        self._warned = False

    def _guard(self, what: str, fn, *args, **kwargs) -> None:
        if self.run_id is None:
            return
        try:
            fn(*args, **kwargs)
        except Exception as e:  # tracking must never crash training
            if not self._warned:
                log.warning("MLflow %s failed for run %s (training continues): %s", what, self.run_id, e)
                self._warned = True

    def metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float))]
        self._guard("log_metrics", self.client.log_batch, self.run_id, metrics=batch)

    def params(self, params: dict[str, Any]) -> None:
        flat = flatten(params)
        from mlflow.entities import Param

        self._guard("log_params", self.client.log_batch, self.run_id, params=[Param(k, v[:6000]) for k, v in flat.items()])

    def tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self._guard("set_tags", self.client.log_batch, self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
