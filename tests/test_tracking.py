"""RunLogger against a real MLflow server process that goes away and comes back."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from helpers import free_port, start_mlflow_server

from pipeline.tracking import RunLogger


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
