"""MLflow tracking: RunLogger against a real MLflow server process that goes away and comes back; where a
relative SQLite tracking URI points."""

from __future__ import annotations

import json
from pathlib import Path

from mlflow.tracking import MlflowClient

from helpers import free_port, start_mlflow_server

from pipeline.tracking import (PENDING_PREFIX, RunLogger, finish_run, get_or_create_experiment, pending_files,
                               resolve_tracking_uri, sync_pending)


def test_logging_survives_an_outage_and_catches_up(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(tmp_path, port)
    try:
        client = MlflowClient(uri)
        run_id = client.create_run(client.create_experiment("outage")).info.run_id
        logger = RunLogger(uri, run_id, cooldown_s=0)
        logger.metrics({"eval_fpr95": 0.5}, step=1)
        server.terminate()
        server.wait(30)
        logger.metrics({"eval_fpr95": 0.4}, step=2)  # server gone: queued, no exception
        logger.metrics({"eval_fpr95": 0.3}, step=3)
        assert logger.pending == 2
        server = start_mlflow_server(tmp_path, port)
        logger.metrics({"eval_fpr95": 0.2}, step=4)
        assert logger.pending == 0
        history = MlflowClient(uri).get_metric_history(run_id, "eval_fpr95")
        assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.4), (3, 0.3), (4, 0.2)]
    finally:
        server.terminate()
        server.wait(30)


def test_what_an_outage_leaves_is_written_down_and_sent_once(tmp_path, monkeypatch):
    """A run that ends while the server is down: its queue and its final status go to pending files in
    the run's folder; `sync_pending` sends them once the server is back, skips a re-run epoch the
    server already has, and leaves alone files it must not follow (another server, not JSON)."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    runs = tmp_path / "runs"
    server = start_mlflow_server(tmp_path, port)
    try:
        client = MlflowClient(uri)
        run_id = client.create_run(client.create_experiment("pending")).info.run_id
        logger = RunLogger(uri, run_id, cooldown_s=0)
        logger.metrics({"eval_fpr95": 0.5, "train_loss": 1.0}, step=1, once_key="eval_fpr95")
        assert logger.pending == 0
        server.terminate()
        server.wait(30)
        logger.metrics({"eval_fpr95": 0.5, "train_loss": 1.0}, step=1, once_key="eval_fpr95")  # epoch 1 re-run
        logger.metrics({"eval_fpr95": 0.4, "train_loss": 0.8}, step=2, once_key="eval_fpr95")
        queued = logger.close(str(runs / "r1"), attempts=2, wait_s=0)
        status = finish_run(client, run_id, "FINISHED", str(runs / "r1"))
        assert queued and status and sorted(pending_files(str(runs))) == sorted([queued, status])
        assert json.loads(Path(queued).read_text())["run_id"] == run_id
        # what sync must not send: a file recorded for another server, and one that is not JSON
        (runs / "r2").mkdir()
        foreign = runs / "r2" / f"{PENDING_PREFIX}{run_id}-other.json"
        foreign.write_text(Path(queued).read_text().replace(uri, "http://elsewhere.invalid:5000"))
        broken = runs / f"{PENDING_PREFIX}broken.json"
        broken.write_text("{not json")

        kept = sync_pending(str(runs), uri)  # still down: everything stays
        assert kept.sent == [] and sorted(kept.left) == sorted([queued, status])

        server = start_mlflow_server(tmp_path, port)
        done = sync_pending(str(runs), uri)
        assert sorted(done.sent) == sorted([queued, status]) and sorted(done.skipped) == sorted([str(foreign), str(broken)])
        assert sorted(pending_files(str(runs))) == sorted([str(foreign), str(broken)])
        history = client.get_metric_history(run_id, "eval_fpr95")
        assert sorted((m.step, m.value) for m in history) == [(1, 0.5), (2, 0.4)]  # epoch 1 not twice
        assert len(client.get_metric_history(run_id, "train_loss")) == 2
        assert client.get_run(run_id).info.status == "FINISHED"
    finally:
        server.terminate()
        server.wait(30)


def test_a_relative_sqlite_uri_names_one_database_from_any_working_directory(tmp_path, monkeypatch):
    # A config's `tracking_uri: sqlite:///mlflow.db` once failed before training ("relative path can't
    # be expressed as a file URI"), and Ray's workers, in other working directories, would open other files.
    (tmp_path / "project").mkdir()
    monkeypatch.chdir(tmp_path / "project")
    uri = resolve_tracking_uri("sqlite:///runs/mlflow.db")
    assert uri == f"sqlite:///{tmp_path / 'project' / 'runs' / 'mlflow.db'}"
    (tmp_path / "project" / "runs").mkdir()
    client = MlflowClient(uri)
    experiment = client.get_experiment(get_or_create_experiment(client, "relative"))
    assert experiment.artifact_location == (tmp_path / "project" / "runs" / "mlartifacts" / "relative").as_uri()
    monkeypatch.chdir(tmp_path)  # elsewhere, the absolute URI still finds the same experiment
    assert MlflowClient(uri).get_experiment_by_name("relative").experiment_id == experiment.experiment_id
    assert resolve_tracking_uri(uri) == uri and resolve_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert resolve_tracking_uri("sqlite:///:memory:") == "sqlite:///:memory:"  # not a file
