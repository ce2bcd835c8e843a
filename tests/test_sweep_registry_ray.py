"""A sweep through ``pipeline.workflow.sweep`` (Ray Tune over Ray Train, then the PCA search,
registration, promotion and the baselines) on a real Ray cluster and SQLite MLflow. The tests share
one sweep of two trials: each Tune trial is a Ray Train fit, ~30 CPU-s of process start-ups."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from helpers import small_config
from pipeline import load_descriptor
from pipeline.checkpoint import model_from_checkpoint
from pipeline.data.shards import shard_paths
from pipeline.data.stream import load_pairs
from pipeline.evaluate import METRIC, evaluate_pairs, pair_distances
from pipeline.metrics import average_precision, fpr_at_95_recall
from pipeline.models import create_model
from pipeline.models.opencv import OPENCV_MODELS
from pipeline.models.sift import SIFT
from pipeline.protocols.common import SIFT_NAME
from pipeline.registry import promote, register_checkpoint
from pipeline.tune import effect_of
from pipeline.workflow import sweep

EVAL_PAIRS = 256


@pytest.fixture(scope="module")
def sweep_run(ray_cluster, synthetic_shards, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    cfg = small_config(
        synthetic_shards, tmp, uri, data={"eval_pairs": EVAL_PAIRS},
        train={"epochs": 2, "batches_per_epoch": 4},
        sweep={"num_samples": 1, "workers_per_trial": 1, "grace_period": 2, "pca_dims": [16],
               "search_space": {"loss.mc_mu": {"grid": [0.0, 0.1]}, "train.batch_size": {"choice": [16, 32]}}},
    )
    lines: list[str] = []
    report = sweep([cfg], progress=lines.append)
    return cfg, report, uri, tmp, lines


def test_sweep_logs_a_parent_with_one_child_per_trial(sweep_run):
    cfg, report, uri, _, _ = sweep_run
    result = report.architectures[0].sweep
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


def test_registration_loads_back_and_reproduces_the_trained_module(sweep_run, synthetic_shards):
    cfg, report, uri, tmp, _ = sweep_run
    best = report.architectures[0].sweep.best
    pairs, labels, _ = load_pairs(shard_paths(cfg.data.shards, "eval"), cfg.data.eval_pairs)
    # the checkpoint as trained (no PCA head), under a name of its own: the sweep registered its
    # best PCA head as test-hardnet
    plain = small_config(synthetic_shards, tmp, uri, data={"eval_pairs": EVAL_PAIRS}, mlflow={"registered_model": "plain-{arch}"})
    reg = register_checkpoint(plain, best.checkpoint_path, best.mlflow_run_id, sweep_id=report.sweep_id)
    first = promote(reg.model_name, pairs, labels, tracking_uri=uri)
    assert reg.model_name == "plain-hardnet" and first.promoted and first.champion_version is None

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
    assert version.tags["architecture"] == "hardnet" and version.tags["sweep_id"] == report.sweep_id
    assert version.tags["data_manifest_sha256"] == hashlib.sha256((Path(cfg.data.shards) / "manifest.json").read_bytes()).hexdigest()
    assert version.tags["checkpoint"] == best.checkpoint_path and version.tags["input_size"] == "32"


def test_sweep_returns_what_it_registered_and_logged(sweep_run, synthetic_shards, tmp_path):
    """What ``workflow.sweep`` returns, against independent recomputations and what it logged."""
    cfg, report, uri, _, lines = sweep_run
    client = MlflowClient(uri)
    parent = client.get_run(report.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["patchflow.sweep_id"] == report.sweep_id
    (arch,) = report.architectures
    assert arch.arch == "hardnet" and arch.best is arch.sweep.best and arch.best.checkpoint_path
    assert any(line.startswith(f"[patchflow] hardnet: best trial {arch.best.trial_id}") for line in lines)

    # the PCA search: the curve it returns is the one on the parent run
    history = client.get_metric_history(report.parent_run_id, "hardnet/pca_fpr95")
    assert arch.pca_curve == [(m.step, m.value) for m in history] and [d for d, _ in arch.pca_curve] == [16]

    # registration and promotion, re-derived from the registry and the same eval pairs
    reg, promo = arch.registration, arch.promotion
    version = client.get_model_version(reg.model_name, reg.version)
    assert version.tags[METRIC] == f"{reg.fpr95:.6f}" and version.tags["sweep_id"] == report.sweep_id
    assert promo.promoted and promo.challenger_version == reg.version  # the first version: no champion before
    pairs, labels, _ = load_pairs(shard_paths(synthetic_shards, "eval"), EVAL_PAIRS)
    assert report.eval_pairs == len(labels)
    assert reg.fpr95 == pytest.approx(fpr_at_95_recall(reg.distances, labels))
    assert arch.eval_ap == pytest.approx(average_precision(reg.distances, labels))
    sift = pair_distances(SIFT(pairs.shape[-1]), pairs)
    assert report.sift_fpr95 == pytest.approx(fpr_at_95_recall(sift, labels))
    assert parent.data.metrics[f"sift/{METRIC}"] == pytest.approx(report.sift_fpr95)
    assert parent.data.metrics["hardnet/eval_ap"] == pytest.approx(arch.eval_ap)

    # the leaderboard it returns is the one logged, with a row per architecture and SIFT
    logged = Path(client.download_artifacts(report.parent_run_id, "leaderboard.txt", str(tmp_path))).read_text()
    assert logged == report.leaderboard + "\n"
    rows = report.leaderboard.splitlines()
    assert rows[2].split()[:1] == ["hardnet"] and rows[2].endswith("champion")
    assert rows[3].startswith(SIFT_NAME) and f"{report.sift_fpr95:.4f}" in rows[3]
    # OpenCV's baselines under SIFT (the [baselines] extra is part of [test]), on the same eval pairs
    assert list(report.baselines) == list(OPENCV_MODELS)
    for row, name in zip(rows[4:], OPENCV_MODELS, strict=True):
        fpr = fpr_at_95_recall(pair_distances(create_model(name), pairs), labels)
        assert report.baselines[name][0] == pytest.approx(fpr) == parent.data.metrics[f"{name}/{METRIC}"]
        assert row.startswith(name) and f"{fpr:.4f}" in row
    assert np.isfinite(report.seconds)
