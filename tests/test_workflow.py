"""pipeline.workflow called directly: the result objects it returns against independent
recomputations and against what it logged to MLflow (the CLI only prints them). The evaluation
commands' functions are tested in tests/test_evaluation.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from helpers import small_config
from pipeline.data.shards import shard_paths
from pipeline.data.stream import load_pairs
from pipeline.evaluate import METRIC, pair_distances
from pipeline.metrics import average_precision, fpr_at_95_recall
from pipeline.models import create_model
from pipeline.models.opencv import OPENCV_MODELS
from pipeline.models.sift import SIFT
from pipeline.protocols.common import SIFT_NAME
from pipeline.workflow import sweep



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
    # OpenCV's baselines under SIFT (the [baselines] extra is part of [test]), on the same eval pairs
    assert list(report.baselines) == list(OPENCV_MODELS)
    for row, name in zip(rows[4:], OPENCV_MODELS, strict=True):
        fpr = fpr_at_95_recall(pair_distances(create_model(name), pairs), labels)
        assert report.baselines[name][0] == pytest.approx(fpr) == parent.data.metrics[f"{name}/{METRIC}"]
        assert row.startswith(name) and f"{fpr:.4f}" in row
    assert np.isfinite(report.seconds)


def test_a_run_name_finds_its_mlflow_run_again_and_a_new_name_opens_another(tmp_path):
    """What `patchflow train` does with ``run.name`` before Ray starts (tests/test_train_resume.py
    kills and resumes a real run): the same name reopens its MLflow run, which has the config's
    parameters; a new name gets a run of its own."""
    from pipeline.workflow import _open_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = small_config(tmp_path / "shards", tmp_path, uri)
    client = MlflowClient(uri)
    first = _open_run(client, cfg, "resumable")
    assert _open_run(client, cfg, "resumable") == first
    other = _open_run(client, cfg, "another")
    assert other != first
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert {r.data.tags["patchflow.run_name"]: r.info.run_id for r in runs} == {"resumable": first, "another": other}
    assert client.get_run(first).data.params["train.epochs"] == "2"
