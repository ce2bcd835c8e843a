"""`patchflow train` end to end, and killed: the shipped config with --set overrides, tracking in the
default SQLite file of the working directory; the same command (same run.name) resumes the Ray Train
run from its checkpoint and logs into the same MLflow run (that a new name opens a run of its own is
tested without Ray in tests/test_workflow.py)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from pipeline.evaluate import METRIC

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "train.yaml"


def test_killed_train_resumes_under_the_same_name(synthetic_shards, ray_cluster, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "pipeline.cli", "train", "--config", str(CONFIG),
           "--set", f"data.shards={synthetic_shards}", "--set", "data.eval_pairs=256", "--set", "train.epochs=3",
           "--set", "train.batches_per_epoch=4", "--set", "train.batch_size=16", "--set", "scaling.num_workers=1"]
    env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},  # the default: ./mlflow.db
           # join the session cluster: a killed driver's job (its Tune/Train actors) dies with it,
           # and each CLI run saves starting and stopping a Ray of its own
           "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    first = subprocess.Popen(cmd + ["--set", "run.name=resumable"], cwd=tmp_path, start_new_session=True, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = MlflowClient(uri)
    deadline = time.time() + 180
    try:
        while time.time() < deadline:
            time.sleep(1)
            runs = client.search_runs([e.experiment_id for e in client.search_experiments()]) if (tmp_path / "mlflow.db").exists() else []
            if runs and len(client.get_metric_history(runs[0].info.run_id, METRIC)) >= 1:
                break
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    run_id = runs[0].info.run_id
    assert client.get_run(run_id).info.status == "RUNNING"  # what a killed driver leaves behind

    again = subprocess.run(cmd + ["--set", "run.name=resumable"], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    # the console: one line per epoch the resumed run trained, and none of Ray's own output
    epochs = re.findall(r"^\[patchflow\] resumable: epoch (\d)/3, step \d+/12, \d+ pairs/s, eval FPR95 [01]\.\d{4}$", again.stdout, re.M)
    assert epochs and epochs[-1] == "3", again.stdout
    for chatter in ("RayTrainWorker", "TrainController", "core_worker", "(raylet)"):
        assert chatter not in again.stdout + again.stderr, (chatter, again.stdout[-2000:], again.stderr[-2000:])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.run_id for r in runs] == [run_id] and runs[0].info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run_id, METRIC)) == [1, 2, 3]  # resumed, no duplicates
    # the summary names the run's figure, and the run holds the validated config and its name
    assert re.search(rf"^\[patchflow\] run resumable: {METRIC}=[01]\.\d{{4}} after 3 epoch\(s\)$", again.stdout, re.M), again.stdout
    assert runs[0].data.params["train.batch_size"] == "16" and runs[0].data.tags["patchflow.run_name"] == "resumable"
    assert client.get_experiment(runs[0].info.experiment_id).name == "patchflow"  # the config's experiment
    assert (tmp_path / "runs" / "resumable").is_dir()

