"""An interrupted sweep (driver killed) resumes with `patchflow sweep --resume`: finished trials are
not re-run, unfinished ones continue from their checkpoints in their own MLflow runs."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from pipeline.evaluate import METRIC


def _children(client, parent_id):
    exp = client.get_run(parent_id).info.experiment_id
    return client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent_id}'")


def test_killed_sweep_resumes_without_rerunning_finished_trials(synthetic_shards, ray_cluster, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = tmp_path / "sweep.yaml"
    config.write_text(f"""
data: {{shards: {synthetic_shards}, eval_pairs: 256}}
train: {{epochs: 3, batch_size: 16, batches_per_epoch: 4}}
run: {{storage_path: {tmp_path / 'runs'}}}
mlflow: {{tracking_uri: "{uri}", experiment: resume-test}}
sweep:
  num_samples: 1
  workers_per_trial: 1
  max_concurrent_trials: 1
  grace_period: 3
  search_space: {{loss.margin: {{grid: [0.5, 1.0]}}}}  # two trials: one finished, one cut mid-way
""")
    # --resume finds the sweep in the tracking store named by MLFLOW_TRACKING_URI (or ./mlflow.db)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MLFLOW_TRACKING_URI": uri,
           # join the session cluster: a killed driver's job (its Tune/Train actors) dies with it,
           # and each CLI run saves starting and stopping a Ray of its own
           "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    cmd = [sys.executable, "-m", "pipeline.cli", "sweep", "--no-register"]
    first = subprocess.Popen(cmd + ["--config", str(config)], cwd=tmp_path, env=env, start_new_session=True,
                             stdout=open(tmp_path / "first.log", "w"), stderr=subprocess.STDOUT)
    client = MlflowClient(uri)
    deadline = time.time() + 240
    parent_id = None
    try:  # kill the driver once one trial has finished and the next has reported an epoch
        while time.time() < deadline:
            time.sleep(1)
            exp = client.get_experiment_by_name("resume-test")
            parents = client.search_runs([exp.experiment_id], "tags.`patchflow.kind` = 'sweep'") if exp else []
            if not parents:
                continue
            parent_id = parents[0].info.run_id
            epochs = {c.info.run_id: len(client.get_metric_history(c.info.run_id, METRIC)) for c in _children(client, parent_id)}
            if sorted(epochs.values())[-2:] == [1, 3] or sorted(epochs.values())[-2:] == [2, 3]:
                break  # one trial done, the next one mid-way
        else:
            pytest.fail("the sweep did not get far enough to be interrupted")
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    before = {c.info.run_id: [m.step for m in client.get_metric_history(c.info.run_id, METRIC)] for c in _children(client, parent_id)}
    done_before = {run_id for run_id, steps in before.items() if len(steps) == 3}

    sweep_id = client.get_run(parent_id).data.tags["patchflow.sweep_id"]
    resumed = subprocess.run(cmd + ["--resume", sweep_id], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resuming sweep {sweep_id}" in resumed.stdout
    # the console: one line per trial and epoch (the restored Tuner kept its callback), no status
    # table, none of Ray's own output
    lines = re.findall(r"^\[patchflow\] hardnet (\w+): epoch (\d)/3, step \d+/12, \d+ pairs/s, eval FPR95 [01]\.\d{4}$",
                       resumed.stdout, re.M)
    assert lines and all(epoch == "3" for _, epoch in lines[-1:]), resumed.stdout
    for chatter in ("Trial status", "Configuration for experiment", "RayTrainWorker", "TrainController", "core_worker",
                    "(raylet)"):
        assert chatter not in resumed.stdout + resumed.stderr, (chatter, resumed.stdout[-2000:], resumed.stderr[-2000:])

    children = _children(client, parent_id)
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children), (
        [c.info.status for c in children], resumed.stdout[-4000:], resumed.stderr[-4000:])
    for c in children:
        steps = [m.step for m in client.get_metric_history(c.info.run_id, METRIC)]
        assert sorted(steps) == [1, 2, 3], f"{c.info.run_id}: epochs logged {steps}"  # none twice, none missing
        if c.info.run_id in done_before:
            assert steps == before[c.info.run_id]  # finished before the kill: not re-run
    assert client.get_run(parent_id).info.status == "FINISHED"
