"""Nothing lost, nothing twice, around a tracking-server outage: real training on the session Ray
cluster against a real `mlflow server` process that the test stops and restarts at chosen epochs
(``HandOff``: rank 0 waits at the end of the epoch while the test acts)."""

from __future__ import annotations

import threading
from pathlib import Path

from mlflow.tracking import MlflowClient

from helpers import free_port, small_config, start_mlflow_server
from pipeline.cli import main
from pipeline.evaluate import METRIC
from pipeline.hooks import FailOnce, HandOff, HookList
from pipeline.tracking import pending_files
from pipeline.workflow import train


class ServerControl:
    """Runs the `mlflow server` and answers HandOff requests: ``stop`` terminates it, ``start`` starts it again."""

    def __init__(self, folder: Path, directory: Path) -> None:
        self.folder, self.directory, self.port = folder, directory, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = start_mlflow_server(folder, self.port)
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.wait(0.2):
            for request in sorted(self.directory.glob("*.request")):
                try:
                    if request.stem.startswith("stop"):
                        self.proc.terminate()
                        self.proc.wait(60)
                    else:
                        self.proc = start_mlflow_server(self.folder, self.port)
                except BaseException as e:  # noqa: BLE001 - reported by close()
                    self.errors.append(e)
                request.unlink()
                (self.directory / f"{request.stem}.done").write_text("done")

    def start(self) -> None:
        self.proc = start_mlflow_server(self.folder, self.port)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(30)
        self.proc.terminate()
        self.proc.wait(60)
        assert not self.errors, self.errors


def test_outage_across_the_last_epoch_is_kept_and_synced_once(ray_cluster, synthetic_shards, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the driver: fail fast while the server is down
    control = ServerControl(tmp_path / "server", tmp_path)
    try:
        cfg = small_config(synthetic_shards, tmp_path, control.uri, train={"epochs": 2, "batches_per_epoch": 2},
                           scaling={"num_workers": 1}, run={"name": "outage"})
        # the server goes away after epoch 2 is trained, before it is logged, and stays away to the end
        out = train(cfg, hooks=HandOff(str(tmp_path), {1: "stop"}))
        assert out.metrics["epoch"] == 2 and (tmp_path / "stop.done").exists()
        runs = str(tmp_path / "runs")
        # what could not be sent: the worker's queue (epoch 2) and the driver's FINISHED, beside the checkpoints
        assert len(out.pending) == 2 and sorted(out.pending) == sorted(pending_files(runs))
        assert all(Path(p).parent == tmp_path / "runs" / "outage" for p in out.pending)

        control.start()
        client = MlflowClient(control.uri)
        assert [m.step for m in client.get_metric_history(out.mlflow_run_id, METRIC)] == [1]
        assert client.get_run(out.mlflow_run_id).info.status == "RUNNING"
        assert main(["sync", "--storage", runs, "--tracking-uri", control.uri]) == 0
        assert pending_files(runs) == []
        history = client.get_metric_history(out.mlflow_run_id, METRIC)
        assert sorted(m.step for m in history) == [1, 2]
        assert history[-1].value == out.metrics[METRIC]
        assert client.get_run(out.mlflow_run_id).info.status == "FINISHED"
        assert main(["sync", "--storage", runs, "--tracking-uri", control.uri]) == 0  # nothing left: nothing twice
        assert sorted(m.step for m in client.get_metric_history(out.mlflow_run_id, METRIC)) == [1, 2]
    finally:
        control.close()


def test_kill_after_an_unsent_epoch_and_an_outage_at_restart_log_each_epoch_once(ray_cluster, synthetic_shards, tmp_path,
                                                                                  monkeypatch):
    """Epoch 2 cannot be logged (server down) and is reported with its checkpoint; the worker is killed
    in epoch 3, so its in-memory queue is gone; it restarts while the server is still down (MLflow
    cannot say which epochs it has) and the server comes back after epoch 3 is trained."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    control = ServerControl(tmp_path / "server", tmp_path)
    try:
        cfg = small_config(synthetic_shards, tmp_path, control.uri, train={"epochs": 3, "batches_per_epoch": 2},
                           scaling={"num_workers": 1}, run={"name": "killed", "max_failures": 1})
        marker = tmp_path / "failed-once"
        hooks = HookList([HandOff(str(tmp_path), {1: "stop", 2: "start"}), FailOnce(rank=0, step=4, marker=str(marker))])
        out = train(cfg, hooks=hooks)

        assert marker.read_text() == "failed at epoch 2 step 4"
        assert (tmp_path / "stop.done").exists() and (tmp_path / "start.done").exists()
        assert out.pending == [] and pending_files(str(tmp_path / "runs")) == []
        client = MlflowClient(control.uri)
        history = client.get_metric_history(out.mlflow_run_id, METRIC)
        assert sorted(m.step for m in history) == [1, 2, 3]  # epoch 2 from the checkpoint, epoch 1 not twice
        assert len(client.get_metric_history(out.mlflow_run_id, "train_loss")) == 3
        assert client.get_run(out.mlflow_run_id).info.status == "FINISHED"
    finally:
        control.close()
