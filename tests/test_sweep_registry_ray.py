"""A multi-architecture sweep as ``patchflow sweep --config`` runs it (Ray Tune over Ray Train, then
the PCA search, registration, promotion and the baselines) on a real Ray cluster and SQLite MLflow,
and ``patchflow export`` of a champion. The tests share one sweep of two architectures (hardnet: two
grid trials, tfeat: one Optuna trial), because each Tune trial is a Ray Train fit: ~30 CPU-s of
process start-ups."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline import load_descriptor
from pipeline.checkpoint import load_state, model_from_checkpoint
from pipeline.cli import main
from pipeline.config import Config, load_sweep, parse_overrides
from pipeline.data.shards import shard_paths
from pipeline.data.stream import load_pairs
from pipeline.evaluate import METRIC, evaluate_pairs, pair_distances
from pipeline.export import load_exported
from pipeline.metrics import average_precision, fpr_at_95_recall
from pipeline.models import create_model
from pipeline.models.opencv import OPENCV_MODELS
from pipeline.models.sift import SIFT
from pipeline.protocols.common import SIFT_NAME
from pipeline.registry import promote, register_checkpoint
from pipeline.tune import effect_of
from pipeline.workflow import SweepReport, sweep

EVAL_PAIRS = 256
ARCHS = ("hardnet", "tfeat")  # the sweep file's order: load_sweep's, the report's and the leaderboard's
REPO_MODELS = Path(__file__).resolve().parents[1] / "configs" / "models"


class SharedSweep(NamedTuple):
    configs: list[Config]  # one per architecture, as load_sweep gave them
    report: SweepReport
    uri: str
    tmp: Path
    lines: list[str]  # the progress lines


@pytest.fixture(scope="module")
def sweep_run(ray_cluster, synthetic_shards, tmp_path_factory) -> SharedSweep:
    tmp = tmp_path_factory.mktemp("sweep")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    path = tmp / "sweep.yaml"
    # grace_period = epochs: ASHA stops no trial before max_t, so every trial ends FINISHED.
    # Registered models keep the default name, patchflow-{arch}.
    path.write_text(f"""
data: {{shards: {synthetic_shards}, eval_pairs: {EVAL_PAIRS}, shuffle_buffer: 256}}
train: {{epochs: 2, batch_size: 16, batches_per_epoch: 3}}
run: {{storage_path: {tmp / 'runs'}}}
mlflow: {{tracking_uri: "{uri}", experiment: multi}}
sweep:
  models_dir: {REPO_MODELS}
  num_samples: 1
  workers_per_trial: 1
  grace_period: 2
  pca_dims: [16, 64]
  architectures:
    hardnet: {{search_space: {{loss.mc_mu: {{grid: [0.0, 0.1]}}, train.batch_size: {{choice: [16, 32]}}}}}}
    tfeat: {{search_space: {{train.lr: {{loguniform: [0.001, 0.1]}}}},
            overrides: {{sweep.search_alg: optuna, sweep.scope: last}}}}
""")
    # The two calls `patchflow sweep --config FILE` makes (pipeline.cli.cmd_sweep), not main() itself:
    # the CLI returns only an exit code and these tests need the SweepReport. What the CLI prints
    # around it is report.leaderboard and a summary line; the leaderboard is checked below. (The CLI's
    # own sweep path runs in tests/test_sweep_resume.py.)
    configs = load_sweep(path, parse_overrides([]))
    assert [c.model.arch for c in configs] == list(ARCHS)
    lines: list[str] = []
    report = sweep(configs, progress=lines.append)
    return SharedSweep(configs, report, uri, tmp, lines)


def test_sweep_logs_a_parent_with_one_child_per_trial(sweep_run):
    report, uri = sweep_run.report, sweep_run.uri
    assert [a.arch for a in report.architectures] == list(ARCHS)
    hardnet, tfeat = (a.sweep for a in report.architectures)
    assert len(hardnet.trials) == 2 and len(tfeat.trials) == 1  # hardnet's grid; tfeat's one sample
    trials = {t.mlflow_run_id: (a.arch, t) for a in report.architectures for t in a.sweep.trials}
    assert all(t.error is None for _, t in trials.values())
    client = MlflowClient(uri)
    parent = client.get_run(report.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["patchflow.sweep_id"] == report.sweep_id
    assert all(r.parent_run_id == report.parent_run_id and r.sweep_id == report.sweep_id for r in (hardnet, tfeat))
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{report.parent_run_id}'")
    assert {c.info.run_id for c in children} == set(trials)
    assert sorted(c.data.tags["patchflow.arch"] for c in children) == ["hardnet", "hardnet", "tfeat"]
    # all ran to max_t: the driver's status stands (a trial actor killed at max_t once overwrote it)
    assert [c.info.status for c in children] == ["FINISHED"] * 3
    for child in children:
        arch, trial = trials[child.info.run_id]
        assert child.data.tags["patchflow.arch"] == arch
        if arch == "hardnet":
            assert float(child.data.params["loss.mc_mu"]) == trial.params["loss.mc_mu"]  # params = validated config
            assert int(child.data.params["train.batch_size"]) == trial.params["train.batch_size"]
        else:
            assert float(child.data.params["train.lr"]) == trial.params["train.lr"]
            assert 0.001 <= trial.params["train.lr"] <= 0.1  # sampled by Optuna's TPE within the space
            assert child.data.params["sweep.search_alg"] == "optuna"  # the architecture's overrides
        history = client.get_metric_history(child.info.run_id, METRIC)
        assert [m.step for m in history] == list(range(1, len(history) + 1))
        # the score and checkpoint of the epoch sweep.scope names: hardnet's best ("all", the default), tfeat's last
        values = [m.value for m in history]
        scored_epoch = len(values) if arch == "tfeat" else 1 + int(np.argmin(values))
        assert trial.fpr95 == pytest.approx(values[scored_epoch - 1])
        assert load_state(trial.checkpoint_path)["metrics"][-1]["epoch"] == trial.scored_epoch == scored_epoch
        assert child.data.tags["patchflow.checkpoint"] == trial.checkpoint_path  # where the trial's model is
    for result in (hardnet, tfeat):
        assert result.best.fpr95 == min(t.fpr95 for t in result.trials)
        assert Path(result.best.checkpoint_path).is_dir()
    effect = effect_of(hardnet.trials, "loss.mc_mu")  # the with / without MC-Loss table
    assert [(mu, n) for mu, _, n in effect] == [(0.0, 1), (0.1, 1)]
    assert {fpr for _, fpr, _ in effect} == {t.fpr95 for t in hardnet.trials}


def test_registration_loads_back_and_reproduces_the_trained_module(sweep_run):
    cfg, report, uri = sweep_run.configs[0], sweep_run.report, sweep_run.uri
    assert cfg.model.arch == "hardnet"
    best = report.architectures[0].sweep.best
    pairs, labels, _ = load_pairs(shard_paths(cfg.data.shards, "eval"), cfg.data.eval_pairs)
    # the checkpoint as trained (no PCA head), under a name of its own: the sweep registered it (with
    # its best PCA head, when one beat none) as patchflow-hardnet
    plain = cfg.with_updates({"mlflow.registered_model": "plain-{arch}"})
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
    assert version.tags["pca_fit"] == "none"  # no head: the PCA curve's dims did not beat the 128-d tower (shape above)


def test_sweep_returns_what_it_registered_and_logged(sweep_run, synthetic_shards, tmp_path):
    """What ``workflow.sweep`` returns, against independent recomputations and what it logged."""
    report, uri, lines = sweep_run.report, sweep_run.uri, sweep_run.lines
    client = MlflowClient(uri)
    parent = client.get_run(report.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["patchflow.sweep_id"] == report.sweep_id
    assert {"hardnet/best_eval_fpr95", "tfeat/best_eval_fpr95", f"sift/{METRIC}"} <= set(parent.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(report.parent_run_id, "plots")}
    assert {"plots/roc.png", "plots/distances_hardnet.png", "plots/distances_sift.png", "plots/pca_hardnet.png"} <= artifacts
    pairs, labels, _ = load_pairs(shard_paths(synthetic_shards, "eval"), EVAL_PAIRS)
    assert report.eval_pairs == len(labels)

    for arch, name in zip(report.architectures, ARCHS, strict=True):
        assert arch.arch == name and arch.best is arch.sweep.best and arch.best.checkpoint_path
        said = f"{arch.best.fpr95:.4f} at epoch {arch.best.scored_epoch}/2 (its {'last' if name == 'tfeat' else 'best'})"
        said_first = f"[patchflow] {name}: best trial {arch.best.trial_id}"
        assert any(line.startswith(said_first) and line.endswith(said) for line in lines)

        # the PCA search: the curve it returns is the one on the parent run
        history = client.get_metric_history(report.parent_run_id, f"{name}/pca_fpr95")
        assert arch.pca_curve == [(m.step, m.value) for m in history] and [d for d, _ in arch.pca_curve] == [16, 64]

        # registration and promotion, re-derived from the registry and the same eval pairs
        reg, promo = arch.registration, arch.promotion
        assert reg.model_name == f"patchflow-{name}"
        version = client.get_model_version(reg.model_name, reg.version)
        assert version.tags[METRIC] == f"{reg.fpr95:.6f}" and version.tags["sweep_id"] == report.sweep_id
        assert promo.promoted and promo.challenger_version == reg.version  # the first version: no champion before
        assert reg.fpr95 == pytest.approx(fpr_at_95_recall(reg.distances, labels))
        assert arch.eval_ap == pytest.approx(average_precision(reg.distances, labels))
        assert parent.data.metrics[f"{name}/eval_ap"] == pytest.approx(arch.eval_ap)
    sift = pair_distances(SIFT(pairs.shape[-1]), pairs)
    assert report.sift_fpr95 == pytest.approx(fpr_at_95_recall(sift, labels))
    assert parent.data.metrics[f"sift/{METRIC}"] == pytest.approx(report.sift_fpr95)

    # the leaderboard it returns (the table `patchflow sweep` prints) is the one logged, with a row
    # per architecture, SIFT and OpenCV's baselines
    logged = Path(client.download_artifacts(report.parent_run_id, "leaderboard.txt", str(tmp_path))).read_text()
    assert logged == report.leaderboard + "\n"
    board = report.leaderboard
    assert re.search(r"^architecture\s+best config\s+eval FPR95\s+eval AP", board, re.MULTILINE)
    for name in ARCHS:
        assert re.search(rf"^{name}\s+.*patchflow-{name} v1\s+champion$", board, re.MULTILINE), board
    assert re.search(r"^sift \(kornia\)\s+untrained baseline\s+0\.\d{4}", board, re.MULTILINE)
    rows = board.splitlines()
    assert [row.split()[:1] for row in rows[2:4]] == [["hardnet"], ["tfeat"]]
    assert rows[4].startswith(SIFT_NAME) and f"{report.sift_fpr95:.4f}" in rows[4]
    # OpenCV's baselines under SIFT (the [baselines] extra is part of [test]), on the same eval pairs
    assert list(report.baselines) == list(OPENCV_MODELS)
    for row, name in zip(rows[5:], OPENCV_MODELS, strict=True):
        fpr = fpr_at_95_recall(pair_distances(create_model(name), pairs), labels)
        assert report.baselines[name][0] == pytest.approx(fpr) == parent.data.metrics[f"{name}/{METRIC}"]
        assert row.startswith(name) and f"{fpr:.4f}" in row
    assert np.isfinite(report.seconds)


def test_export_of_the_champion_to_onnx(sweep_run, tmp_path, monkeypatch):
    """`patchflow export` (the real CLI) of the sweep's hardnet champion, from the registry."""
    uri = sweep_run.uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    target = tmp_path / "hardnet.onnx"
    assert main(["export", "--model", "models:/patchflow-hardnet@champion", "--format", "onnx", "--out", str(target)]) == 0
    x = np.random.default_rng(1).random((5, 1, 32, 32), dtype=np.float32)
    with torch.no_grad():
        expected = load_descriptor("models:/patchflow-hardnet@champion", tracking_uri=uri)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(load_exported(target)(x), expected, atol=1e-4)


def test_scope_scores_a_trial_by_its_best_or_its_last_epoch():
    """sweep.scope on a Tune result whose best epoch is not its last (the demo's case: epoch 1 best on a
    small eval split by noise): "all" takes epoch 2's score and checkpoint, "last" epoch 3's."""
    import pandas as pd
    from ray.tune import Result

    from pipeline.tune import _outcome

    history = pd.DataFrame({"epoch": [1, 2, 3], METRIC: [0.20, 0.15, 0.16], "trial_id": ["t0"] * 3,
                            "checkpoint_path": ["/runs/t0/checkpoint_1", "/runs/t0/checkpoint_2", "/runs/t0/checkpoint_3"]})
    result = Result(metrics=history.iloc[-1].to_dict(), checkpoint=None, error=None, path="/runs/t0", metrics_dataframe=history)
    best, last = (_outcome(result, {"t0": "run0"}, scope) for scope in ("all", "last"))
    assert (best.fpr95, best.checkpoint_path, best.scored_epoch) == (0.15, "/runs/t0/checkpoint_2", 2)
    assert (last.fpr95, last.checkpoint_path, last.scored_epoch) == (0.16, "/runs/t0/checkpoint_3", 3)
    assert best.epochs == last.epochs == 3 and best.mlflow_run_id == last.mlflow_run_id == "run0"
