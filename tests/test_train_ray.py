"""Training on a real local Ray cluster: 2 DDP workers (gloo), real shards, real SQLite MLflow."""

from __future__ import annotations

import os

import pytest
import torch
from mlflow.tracking import MlflowClient

from helpers import checkpoint_fpr95, small_config, untrained_state
from pipeline.checkpoint import load_state
from pipeline.evaluate import METRIC
from pipeline.hooks import DumpParams
from pipeline.tracking import get_or_create_experiment
from pipeline.train import build_trainer


def test_ddp_ranks_stay_in_sync_and_a_restart_does_not_log_an_epoch_twice(ray_cluster, synthetic_shards, tmp_path,
                                                                           tracking_uri):
    """Two DDP ranks keep equal weights and report every epoch. The MLflow run already holds epoch 1,
    as when a driver was killed after rank 0 logged epoch 1 but before Ray recorded its checkpoint:
    the run begins at epoch 1 again, in the same MLflow run, and must not log epoch 1 a second time
    (one fit for both: each Ray Train fit costs ~30 CPU-s of process start-ups)."""
    cfg = small_config(synthetic_shards, tmp_path, tracking_uri)
    client = MlflowClient(tracking_uri)
    run_id = client.create_run(get_or_create_experiment(client, "test")).info.run_id
    client.log_metric(run_id, METRIC, 2.0, step=1)  # the killed attempt's epoch 1 (an impossible FPR95, to tell it apart)
    dump = tmp_path / "params"
    dump.mkdir()
    result = build_trainer(cfg, name="ddp-sync", tracking_uri=tracking_uri, mlflow_run_id=run_id,
                           hooks=DumpParams(str(dump))).fit()

    assert result.metrics["epoch"] == 2
    # The reported figure is the checkpoint's. Whether 10 steps already beat the initial weights
    # depends on the CPU's floating-point order (0.556 vs 0.587 on a Xeon, 0.636 vs 0.536 on an EPYC),
    # so that learning is asserted by longer runs (test_digits.py); here only that the ranks stepped.
    assert result.metrics[METRIC] == checkpoint_fpr95(result.checkpoint.path, cfg)
    initial = untrained_state(cfg)
    for epoch in range(2):
        r0 = torch.load(dump / f"rank0-epoch{epoch}.pt")
        r1 = torch.load(dump / f"rank1-epoch{epoch}.pt")
        weights = [k for k in r0 if k.endswith("weight")]
        assert weights and all(torch.equal(r0[k], r1[k]) for k in weights), "DDP let the ranks' weights diverge"
        # every layer moved by optimizer steps (~1e-2 here; 1e-7 of rounding at lr 1e-30)
        assert all((r0[k] - initial[k]).abs().max() > 1e-4 for k in weights), "no optimizer step reached a layer"
        # ...while each rank really saw its own data: BatchNorm running stats are per-rank statistics.
        assert not torch.equal(r0["features.1.running_mean"], r1["features.1.running_mean"])
    # The checkpoint holds the synchronised weights and the MLflow run id.
    state = load_state(result.checkpoint.path) if "://" not in result.checkpoint.path else None
    assert state["mlflow_run_id"] == run_id and state["step"] == 10
    assert all(torch.equal(state["model"][k], r0[k]) for k in weights)
    history = sorted(client.get_metric_history(run_id, METRIC), key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == [(1, 2.0), (2, result.metrics[METRIC])]


def test_session_cluster_polls_fast_and_the_driver_forwards_nothing(ray_cluster):
    """start_local_ray: the cluster's processes poll Train workers every HEALTH_CHECK_INTERVAL_S and
    start no preemption watcher, while the driver's environment lacks the variables, so Ray Train
    sends no runtime_env (which would start every Train actor in a fresh process)."""
    import os

    from pipeline.cluster import LOCAL_CLUSTER_ENV

    @ray_cluster.remote(num_cpus=0)
    def cluster_settings():
        return {key: os.environ.get(key) for key in LOCAL_CLUSTER_ENV}

    assert ray_cluster.get(cluster_settings.remote()) == LOCAL_CLUSTER_ENV
    assert not set(LOCAL_CLUSTER_ENV) & set(os.environ)


def test_the_cluster_finds_itself_when_another_ray_took_the_machine_wide_record(ray_cluster):
    """Inside the cluster, Ray's address auto-detection (what Train's PlacementGroupCleaner uses to
    ask whether the controller lives) answers this cluster, even after another Ray on the machine
    overwrote the machine-wide record. Before start_local_ray gave its cluster a record of its own,
    the cleaner asked the other cluster, heard "no such actor" and killed a zoo run mid-epoch."""
    from ray._private.utils import get_ray_address_file, read_ray_address, write_ray_address

    @ray_cluster.remote(num_cpus=0)
    def detected_address():
        from ray._private.services import get_ray_address_from_environment

        return get_ray_address_from_environment(None, None)

    ours = ray_cluster.get_runtime_context().gcs_address
    previous = read_ray_address()
    write_ray_address("127.0.0.1:1")  # what another Ray started later would leave there
    try:
        assert ray_cluster.get(detected_address.remote()) == ours
    finally:
        if previous:
            write_ray_address(previous)
        else:
            os.remove(get_ray_address_file(None))


@pytest.mark.ray
@pytest.mark.parametrize("previous", ["127.0.0.1:1", None], ids=["record-present", "fresh-machine"])
def test_a_local_cluster_puts_the_machine_wide_record_back_quietly_at_exit(previous):
    """``start_local_ray`` records its cluster as the machine's current one and puts the previous
    record back at exit without Ray's "Overwriting previous Ray address" log line, which at
    interpreter exit could meet a closed stream (a "Logging error" traceback after test runs). On a
    fresh machine (no Ray folder yet, so no record) it creates the folder and removes its record at
    exit. A Ray of its own, in a process of its own, under its own temp dir: no other cluster's
    record is touched."""
    import shutil
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    short = Path(tempfile.mkdtemp(prefix="pf-t-", dir="/tmp"))  # Ray's socket paths under it have a length limit
    record = short / "ray" / "ray_current_cluster"
    if previous:
        record.parent.mkdir()
        record.write_text(previous)
    code = ("import ray; from pipeline.cluster import start_local_ray; start_local_ray(1, include_dashboard=False); "
            f"assert open({str(record)!r}).read() == ray.get_runtime_context().gcs_address")
    try:
        done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "RAY_TMPDIR": str(short)},
                              capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr[-2000:]
        if previous:
            assert record.read_text() == previous
            # one "Overwriting previous Ray address" line, Ray's at start; none from the restore at exit
            assert done.stderr.count("Overwriting previous Ray address") == 1, done.stderr[-2000:]
        else:
            assert not record.exists()
            assert "Overwriting previous Ray address" not in done.stderr
    finally:
        shutil.rmtree(short, ignore_errors=True)
