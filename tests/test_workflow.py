"""pipeline.workflow called directly: the result objects it returns against independent
recomputations and against what it logged to MLflow (the CLI only prints them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from helpers import save_checkpoint, small_config
from pipeline.checkpoint import model_from_checkpoint
from pipeline.config import Config
from pipeline.data.sequences import sequence_pairs
from pipeline.data.shards import shard_paths
from pipeline.data.stream import load_pairs
from pipeline.evaluate import METRIC, pair_distances
from pipeline.metrics import average_precision, fpr_at_95_recall
from pipeline.models import create_model
from pipeline.models.sift import SIFT
from pipeline.protocols.common import SIFT_NAME
from pipeline.workflow import evaluate_sequence, sweep

GRAF = Path(__file__).resolve().parents[1] / "data" / "oxford_graf"


def test_evaluate_sequence_returns_the_scores_it_logs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "ckpt", create_model("l2net"),
                           Config.model_validate({"data": {"shards": "unused"}, "model": {"arch": "l2net"}}))
    report = evaluate_sequence(GRAF, [ckpt], n_pairs=200, seed=1, experiment="wf-eval")

    pairs, labels, _ = sequence_pairs(GRAF, n_pairs=200, seed=1)
    assert (report.pairs, report.positives) == (len(labels), int(labels.sum()))
    for score, scored in zip(report.scores, [SIFT(pairs.shape[-1]), model_from_checkpoint(ckpt)[0]], strict=True):
        d = pair_distances(scored, pairs)
        assert score.fpr95 == pytest.approx(fpr_at_95_recall(d, labels))
        assert score.ap == pytest.approx(average_precision(d, labels))
        assert score.fpr95_low <= score.fpr95 <= score.fpr95_high
    assert [s.name for s in report.scores] == [SIFT_NAME, ckpt]
    assert report.table().splitlines()[2].split()[:3] == ["sift", "(kornia)", f"{report.scores[0].fpr95:.4f}"]

    run = MlflowClient(report.tracking_uri).get_run(report.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.tags["patchflow.kind"] == "evaluation"
    assert run.data.metrics["sift/fpr95"] == pytest.approx(report.scores[0].fpr95)
    assert run.data.metrics["model1/ap"] == pytest.approx(report.scores[1].ap) and run.data.tags["model1.name"] == ckpt
    assert run.data.params["models"] == f"{SIFT_NAME},{ckpt}"


def test_sweep_returns_what_it_registered_and_logged(ray_cluster, synthetic_shards, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = small_config(synthetic_shards, tmp_path, uri,
                       train={"epochs": 1, "batches_per_epoch": 3, "batch_size": 16}, data={"eval_pairs": 256},
                       sweep={"num_samples": 1, "workers_per_trial": 1, "pca_dims": [16]})
    lines: list[str] = []
    report = sweep([cfg], progress=lines.append)

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
    pairs, labels, _ = load_pairs(shard_paths(synthetic_shards, "eval"), 256)
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
    assert np.isfinite(report.seconds)
