"""`patchflow sweep` over several architectures (the demo's path) and `patchflow export` of a champion."""

from __future__ import annotations

import re

import numpy as np
import torch
from mlflow.tracking import MlflowClient

from pipeline import load_descriptor
from pipeline.cli import main
from pipeline.export import load_exported


def test_multi_architecture_sweep_registers_each_and_exports(ray_cluster, synthetic_shards, tmp_path, monkeypatch, capsys):
    repo_models = __import__("pathlib").Path(__file__).resolve().parents[1] / "configs" / "models"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = tmp_path / "sweep.yaml"
    config.write_text(f"""
data: {{shards: {synthetic_shards}, eval_pairs: 256}}
train: {{epochs: 1, batch_size: 16, batches_per_epoch: 3}}
run: {{storage_path: {tmp_path / 'runs'}}}
mlflow: {{tracking_uri: "{uri}", experiment: multi}}
sweep:
  models_dir: {repo_models}
  num_samples: 1
  workers_per_trial: 1
  pca_dims: [16, 64]
  architectures:
    hardnet: {{search_space: {{}}}}  # one trial each (two trials of one architecture: tests/test_sweep_registry_ray.py)
    tfeat: {{search_space: {{train.lr: {{loguniform: [0.001, 0.1]}}}}, overrides: {{sweep.search_alg: optuna}}}}
""")
    assert main(["sweep", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    for arch in ("hardnet", "tfeat"):
        assert re.search(rf"^{arch}\s+.*patchflow-{arch} v1\s+champion$", out, re.M), out[-2000:]
    assert re.search(r"^sift \(kornia\)\s+untrained baseline\s+0\.\d{4}", out, re.M)

    client = MlflowClient(uri)
    parent = client.search_runs([client.get_experiment_by_name("multi").experiment_id], "tags.`patchflow.kind` = 'sweep'")[0]
    assert parent.info.status == "FINISHED"
    assert {"hardnet/best_eval_fpr95", "tfeat/best_eval_fpr95", "sift/eval_fpr95"} <= set(parent.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/roc.png", "plots/distances_hardnet.png", "plots/distances_sift.png", "plots/pca_hardnet.png"} <= artifacts
    assert [m.step for m in client.get_metric_history(parent.info.run_id, "hardnet/pca_fpr95")] == [16, 64]
    assert re.search(r"^architecture\s+best config\s+eval FPR95\s+eval AP", out, re.M)
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.data.tags["patchflow.arch"] for c in children) == ["hardnet", "tfeat"]
    tfeat = next(c for c in children if c.data.tags["patchflow.arch"] == "tfeat")
    assert 0.001 <= float(tfeat.data.params["train.lr"]) <= 0.1  # sampled by Optuna's TPE within the space
    assert tfeat.data.params["sweep.search_alg"] == "optuna"

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    target = tmp_path / "hardnet.onnx"
    assert main(["export", "--model", "models:/patchflow-hardnet@champion", "--format", "onnx", "--out", str(target)]) == 0
    x = np.random.default_rng(1).random((5, 1, 32, 32), dtype=np.float32)
    with torch.no_grad():
        expected = load_descriptor("models:/patchflow-hardnet@champion", tracking_uri=uri)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(load_exported(target)(x), expected, atol=1e-4)
