"""Sweep (Ray Tune over Ray Train) and registry gating on a real Ray cluster and SQLite MLflow."""

from __future__ import annotations

from pathlib import Path

import hashlib
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline import load_descriptor
from pipeline.data.shards import shard_paths
from pipeline.data.stream import load_pairs
from pipeline.checkpoint import model_from_checkpoint
from pipeline.evaluate import METRIC, evaluate_pairs
from pipeline.registry import promote, register_checkpoint
from pipeline.tune import effect_of, run_sweep
from helpers import small_config


@pytest.fixture(scope="module")
def sweep_run(ray_cluster, synthetic_shards, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    cfg = small_config(
        synthetic_shards, tmp, uri,
        train={"epochs": 2, "batches_per_epoch": 4},
        sweep={"num_samples": 1, "workers_per_trial": 1, "grace_period": 2,
               "search_space": {"loss.mc_mu": {"grid": [0.0, 0.1]}, "train.batch_size": {"choice": [16, 32]}}},
    )
    return cfg, run_sweep(cfg), uri, tmp


def test_sweep_logs_a_parent_with_one_child_per_trial(sweep_run):
    cfg, result, uri, _ = sweep_run
    assert len(result.trials) == 2 and all(t.error is None for t in result.trials)
    client = MlflowClient(uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["patchflow.sweep_id"] == result.sweep_id
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")
    assert {c.info.run_id for c in children} == {t.mlflow_run_id for t in result.trials}
    # both ran to max_t: the driver's status stands (a trial actor killed at max_t once overwrote it)
    assert [c.info.status for c in children] == ["FINISHED", "FINISHED"]
    for child, trial in ((c, next(t for t in result.trials if t.mlflow_run_id == c.info.run_id)) for c in children):
        assert float(child.data.params["loss.mc_mu"]) == trial.params["loss.mc_mu"]  # params = validated config
        assert int(child.data.params["train.batch_size"]) == trial.params["train.batch_size"]
        history = client.get_metric_history(child.info.run_id, METRIC)
        assert [m.step for m in history] == list(range(1, len(history) + 1))
        assert min(m.value for m in history) == pytest.approx(trial.best_fpr95)
        assert child.data.tags["patchflow.checkpoint"] == trial.checkpoint_path  # where the trial's model is
    best = result.best
    assert best.best_fpr95 == min(t.best_fpr95 for t in result.trials)
    effect = effect_of(result.trials, "loss.mc_mu")  # the with / without MC-Loss table
    assert [(mu, n) for mu, _, n in effect] == [(0.0, 1), (0.1, 1)]
    assert {fpr for _, fpr, _ in effect} == {t.best_fpr95 for t in result.trials}
    assert Path(best.checkpoint_path).is_dir()


def test_registration_loads_back_and_reproduces_the_trained_module(sweep_run):
    cfg, result, uri, tmp = sweep_run
    best = result.best
    pairs, labels, _ = load_pairs(shard_paths(cfg.data.shards, "eval"), cfg.data.eval_pairs)
    reg = register_checkpoint(cfg, best.checkpoint_path, best.mlflow_run_id, sweep_id=result.sweep_id)
    first = promote(reg.model_name, pairs, labels, tracking_uri=uri)
    assert first.promoted and first.champion_version is None

    # The registered model reproduces the trained module's descriptors and behaves like kornia's HardNet.
    trained, _ = model_from_checkpoint(best.checkpoint_path)
    loaded = load_descriptor(f"models:/{reg.model_name}@champion", tracking_uri=uri)
    assert not loaded.training
    x = torch.rand(16, 1, 32, 32)
    out = loaded(x)
    assert out.shape == (16, 128)
    torch.testing.assert_close(out, trained(x))
    torch.testing.assert_close(out.norm(dim=1), torch.ones(16))
    assert reg.fpr95 == pytest.approx(evaluate_pairs(trained, pairs, labels)[METRIC])

    version = MlflowClient(uri).get_model_version(reg.model_name, reg.version)
    assert version.tags["architecture"] == "hardnet" and version.tags["sweep_id"] == result.sweep_id
    assert version.tags["data_manifest_sha256"] == hashlib.sha256((Path(cfg.data.shards) / "manifest.json").read_bytes()).hexdigest()
    assert version.tags["checkpoint"] == best.checkpoint_path and version.tags["input_size"] == "32"
