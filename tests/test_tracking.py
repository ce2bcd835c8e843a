"""RunLogger against a real MLflow server process that goes away and comes back."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from pipeline.tracking import RunLogger


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(tmp_path, port):
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--default-artifact-root", str(tmp_path / "art"),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            MlflowClient(f"http://127.0.0.1:{port}").search_experiments()
            return proc
        except Exception:
            time.sleep(0.5)
    proc.kill()
    pytest.fail("mlflow server did not start")


def test_logging_survives_an_outage_and_catches_up(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    server = _start_server(tmp_path, port)
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
        server = _start_server(tmp_path, port)
        logger.metrics({"eval_fpr95": 0.2}, step=4)
        assert logger.pending == 0
        history = MlflowClient(uri).get_metric_history(run_id, "eval_fpr95")
        assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.4), (3, 0.3), (4, 0.2)]
    finally:
        server.terminate()
        server.wait(30)
