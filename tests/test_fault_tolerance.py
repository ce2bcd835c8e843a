"""Ray Train FailureConfig: a worker that dies mid-epoch restarts from the latest checkpoint, at the
same step and data position, logging into the same MLflow run, and ends where an uninterrupted run
ends. Tracking that fails never fails training. On the way, what any 2-rank DDP run must show: equal
weights on both ranks at every epoch's end, each rank's own BatchNorm statistics, and an epoch that
the MLflow run already holds is not logged again. One test, and its uninterrupted run is shared with
tests/test_architectures_ray.py: each Ray Train fit costs ~28 CPU-s of process start-ups."""

from __future__ import annotations

import torch
from mlflow.tracking import MlflowClient

from helpers import checkpoint_fpr95, untrained_state
from pipeline.checkpoint import load_state
from pipeline.evaluate import METRIC
from pipeline.hooks import DumpParams, FailOnce, HookList
from pipeline.tracking import get_or_create_experiment
from pipeline.train import build_trainer


def test_worker_failure_resumes_and_matches_an_uninterrupted_run(ddp_fit, tmp_path, tracking_uri):
    # the uninterrupted reference is the 2-worker HardNet fit tests/test_architectures_ray.py checks too
    # (tests/conftest.py ddp_fit: 2 epochs of 3 steps, MC-Loss on, logged to a dead tracking port, which
    # also shows that tracking which fails never fails training)
    reference = ddp_fit("hardnet")
    cfg = reference.cfg
    assert reference.result.metrics["epoch"] == 2 and load_state(reference.result.checkpoint.path)["step"] == 6
    assert reference.result.metrics[METRIC] == checkpoint_fpr95(reference.result.checkpoint.path, cfg)
    client = MlflowClient(tracking_uri)
    experiment = get_or_create_experiment(client, "test")

    run_id = client.create_run(experiment).info.run_id
    # As when a killed driver's attempt logged epoch 1 before Ray recorded its checkpoint: this run starts
    # from scratch in the same MLflow run and must not log epoch 1 again (an impossible FPR95 tells them apart).
    client.log_metric(run_id, METRIC, 2.0, step=1)
    marker, dump = tmp_path / "failed-once", tmp_path / "params"
    dump.mkdir()
    # rank 1 dies in epoch 2 (steps 3..5), after epoch 1's checkpoint was reported
    hooks = HookList([FailOnce(rank=1, step=4, marker=str(marker)), DumpParams(str(dump))])
    result = build_trainer(cfg, name="interrupted", tracking_uri=tracking_uri, mlflow_run_id=run_id, hooks=hooks).fit()

    assert marker.read_text() == "failed at epoch 1 step 4"
    final, expected = load_state(result.checkpoint.path), load_state(reference.result.checkpoint.path)
    assert final["step"] == expected["step"] == 6 and final["mlflow_run_id"] == run_id
    for key, value in expected["model"].items():
        torch.testing.assert_close(final["model"][key], value, rtol=0, atol=1e-6, msg=f"{key} differs after restart")
    history = sorted(client.get_metric_history(run_id, METRIC), key=lambda m: m.step)
    # the failed epoch was not logged twice, nor epoch 1, which the run held before it started
    assert [(m.step, m.value) for m in history] == [(1, 2.0), (2, result.metrics[METRIC])]
    assert result.metrics[METRIC] == reference.result.metrics[METRIC]

    initial = untrained_state(cfg)
    for epoch in range(2):  # epoch 1 (0-based) as the restarted attempt trained it
        r0, r1 = (torch.load(dump / f"rank{r}-epoch{epoch}.pt") for r in (0, 1))
        weights = [k for k in r0 if k.endswith("weight")]
        assert weights and all(torch.equal(r0[k], r1[k]) for k in weights), f"DDP let the ranks' weights diverge in epoch {epoch}"
        # every layer moved by optimizer steps (rounding alone moves weights ~1e-7, seen at lr 1e-30)
        assert all((r0[k] - initial[k]).abs().max() > 1e-4 for k in weights), "no optimizer step reached a layer"
        # ...while each rank really saw its own data: BatchNorm running stats are per-rank statistics
        assert not torch.equal(r0["features.1.running_mean"], r1["features.1.running_mean"])
    assert all(torch.equal(final["model"][k], r0[k]) for k in weights)  # the checkpoint holds the synchronised weights
