"""Ray Train FailureConfig: a worker that dies mid-epoch restarts from the latest checkpoint, at the
same step and data position, logging into the same MLflow run, and ends where an uninterrupted run
ends. Tracking that fails never fails training."""

from __future__ import annotations

import torch
from mlflow.tracking import MlflowClient

from helpers import checkpoint_fpr95, small_config
from pipeline.checkpoint import load_state
from pipeline.evaluate import METRIC
from pipeline.hooks import FailOnce
from pipeline.tracking import get_or_create_experiment
from pipeline.train import build_trainer


def test_worker_failure_resumes_and_matches_an_uninterrupted_run(ray_cluster, synthetic_shards, tmp_path, tracking_uri):
    cfg = small_config(synthetic_shards, tmp_path, tracking_uri, train={"epochs": 3, "batches_per_epoch": 4},
                       run={"max_failures": 1})
    client = MlflowClient(tracking_uri)
    experiment = get_or_create_experiment(client, "test")
    # The uninterrupted reference also shows that tracking which fails never fails training: it logs
    # to a port where nothing listens (one Ray Train run fewer than a test of its own).
    dead = "http://127.0.0.1:9"  # discard port; the workers fail at once (tests/conftest.py)
    reference = build_trainer(cfg, name="uninterrupted", tracking_uri=dead, mlflow_run_id="0" * 32).fit()
    assert reference.metrics["epoch"] == 3 and load_state(reference.checkpoint.path)["step"] == 12
    assert reference.metrics[METRIC] == checkpoint_fpr95(reference.checkpoint.path, cfg)

    run_id = client.create_run(experiment).info.run_id
    marker = tmp_path / "failed-once"
    # rank 1 dies in epoch 2 (steps 4..7), after epoch 1's checkpoint was reported
    result = build_trainer(cfg, name="interrupted", tracking_uri=tracking_uri, mlflow_run_id=run_id,
                           hooks=FailOnce(rank=1, step=6, marker=str(marker))).fit()

    assert marker.read_text() == "failed at epoch 1 step 6"
    final, expected = load_state(result.checkpoint.path), load_state(reference.checkpoint.path)
    assert final["step"] == expected["step"] == 12 and final["mlflow_run_id"] == run_id
    for key, value in expected["model"].items():
        torch.testing.assert_close(final["model"][key], value, rtol=0, atol=1e-6, msg=f"{key} differs after restart")
    history = client.get_metric_history(run_id, METRIC)
    assert sorted(m.step for m in history) == [1, 2, 3]  # the failed epoch was not logged twice
    assert result.metrics[METRIC] == reference.metrics[METRIC]

