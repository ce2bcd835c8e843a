"""Nothing lost, nothing twice, around tracking-server outages: real training on the session Ray
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
    """Runs the `mlflow server` and answers HandOff's ``stop`` request by terminating it; ``start`` starts it again."""

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
            for request in sorted(self.directory.glob("stop*.request")):
                try:
                    self.proc.terminate()
                    self.proc.wait(60)
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


def test_an_outage_across_a_restart_to_the_end_is_kept_and_synced_once(ray_cluster, synthetic_shards, tmp_path,
                                                                       monkeypatch):
    """The server goes away after epoch 2 is trained, before it is logged, and stays away to the end.
    The worker is killed in epoch 3, so its in-memory queue is gone; it restarts while the server is
    down (MLflow cannot say which epochs it has) and carries the epochs from its checkpoint. What
    could not be sent is kept beside the checkpoints, and `patchflow sync` sends each epoch once.
    (One scenario for both: each Ray Train fit costs ~28 CPU-s of start-ups, each server start ~9.
    That the backlog goes out when the server answers again mid-run: tests/test_tracking.py.)"""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the driver: fail fast while the server is down
    control = ServerControl(tmp_path / "server", tmp_path)
    try:
        cfg = small_config(synthetic_shards, tmp_path, control.uri, train={"epochs": 4, "batches_per_epoch": 2},
                           scaling={"num_workers": 1}, run={"name": "outages", "max_failures": 1})
        marker = tmp_path / "failed-once"
        out = train(cfg, hooks=HookList([HandOff(str(tmp_path), {1: "stop"}), FailOnce(rank=0, step=4, marker=str(marker))]))

        assert marker.read_text() == "failed at epoch 2 step 4" and (tmp_path / "stop.done").exists()
        assert out.metrics["epoch"] == 4
        client = MlflowClient(control.uri)
        runs = str(tmp_path / "runs")
        # what could not be sent: the restarted worker's queue (epochs 2-4) and the driver's FINISHED, beside the checkpoints
        assert len(out.pending) == 2 and sorted(out.pending) == sorted(pending_files(runs))
        assert all(Path(p).parent == tmp_path / "runs" / "outages" for p in out.pending)

        control.start()
        assert [m.step for m in client.get_metric_history(out.mlflow_run_id, METRIC)] == [1]
        assert client.get_run(out.mlflow_run_id).info.status == "RUNNING"
        assert main(["sync", "--storage", runs, "--tracking-uri", control.uri]) == 0
        assert pending_files(runs) == []
        history = sorted(client.get_metric_history(out.mlflow_run_id, METRIC), key=lambda m: m.step)
        assert [m.step for m in history] == [1, 2, 3, 4]  # epoch 2 from the checkpoint; epoch 1 not twice
        assert history[-1].value == out.metrics[METRIC]
        assert len(client.get_metric_history(out.mlflow_run_id, "train_loss")) == 4
        assert client.get_run(out.mlflow_run_id).info.status == "FINISHED"
        assert main(["sync", "--storage", runs, "--tracking-uri", control.uri]) == 0  # nothing left: nothing twice
        assert sorted(m.step for m in client.get_metric_history(out.mlflow_run_id, METRIC)) == [1, 2, 3, 4]
    finally:
        control.close()
