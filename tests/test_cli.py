"""The `patchflow` commands end to end on real files: source conversion and evaluation on the
real Oxford graf sequence (data/oxford_graf)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

from pipeline.cli import main
from pipeline.config import Config
from pipeline.data.shards import load_manifest
from pipeline.models import create_model
from helpers import save_checkpoint
from test_phototour import make_dataset, write_raw

GRAF = Path(__file__).resolve().parents[1] / "data" / "oxford_graf"


def test_shards_phototour_command(tmp_path, capsys):
    root = write_raw(tmp_path / "liberty", *make_dataset())
    assert main(["shards", "phototour", str(root), "--out", str(tmp_path / "out"), "--train-pairs", "512",
                 "--pairs-per-block", "64", "--blocks-per-shard", "2"]) == 0
    manifest = load_manifest(tmp_path / "out")
    assert manifest["splits"]["train"]["pairs"] == 512 and manifest["splits"]["eval"]["pairs"] > 0
    assert "train pairs" in capsys.readouterr().out


def test_shards_images_command_on_real_graf(tmp_path):
    before = {p.name: p.stat().st_mtime_ns for p in GRAF.iterdir()}
    assert main(["shards", "images", str(GRAF), "--out", str(tmp_path / "graf"), "--pairs-per-sequence", "600"]) == 0
    eval_split = load_manifest(tmp_path / "graf")["splits"]["eval"]
    assert eval_split["pairs"] == 600 and eval_split["positives"] == 300
    assert {p.name: p.stat().st_mtime_ns for p in GRAF.iterdir()} == before  # the real data is read-only to us


def test_evaluate_command_on_real_graf(tmp_path, monkeypatch, capsys):
    """The command's wiring: its table prints what its MLflow run holds, and --redetect reaches the
    pairs. (The figures themselves are checked against a recomputation in tests/test_workflow.py.)"""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "ckpt", create_model("hardnet"), Config.model_validate({"data": {"shards": "unused"}}))
    args = ["evaluate", "--images", str(GRAF), "--model", ckpt, "--pairs", "400", "--seed", "3"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    for redetect in (False, True):
        assert main(args + (["--redetect"] if redetect else [])) == 0
        out = capsys.readouterr().out
        run = client.search_runs([client.get_experiment_by_name("patchflow-evaluation").experiment_id],
                                 order_by=["attributes.start_time DESC"])[0]
        assert run.data.params["redetect"] == str(redetect)
        m = run.data.metrics
        assert re.search(rf"sift \(kornia\)\s+{m['sift/fpr95']:.4f}\s+\[{m['sift/fpr95_low']:.4f}, {m['sift/fpr95_high']:.4f}\]"
                         rf"\s+{m['sift/ap']:.4f}", out), out
        assert re.search(rf"{re.escape(ckpt)}\s+{m['model1/fpr95']:.4f}\s", out)
        assert f"{run.data.params['pairs']} pairs" in out and run.info.run_id in out


def test_shards_digits_and_synthetic_mix_commands(tmp_path, capsys):
    """`shards digits` writes the digits example's shards; a synthetic mix is recorded in the
    manifest; a bad mix is one line and exit 2 with nothing written."""
    assert main(["shards", "digits", "--out", str(tmp_path / "dg"), "--train-pairs", "512", "--eval-pairs", "256"]) == 0
    assert load_manifest(tmp_path / "dg")["source"] == "digits"
    capsys.readouterr()  # the conversion's progress output
    assert main(["shards", "synthetic", "--out", str(tmp_path / "bad"), "--train-mix", "dog-sideways=1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--train-mix" in err and "dog-sideways" in err
    assert not (tmp_path / "bad").exists()


def test_evaluate_model_spec_names_an_untrained_baseline(tmp_path):
    """`--model sift` / `--model opencv_sift` need no weights; a trainable name without weights is
    refused with a pointer to what to pass."""
    import pytest

    from pipeline.config import ConfigError
    from pipeline.workflow import load_model

    x = torch.rand(4, 1, 32, 32)
    torch.testing.assert_close(load_model("sift")(x), create_model("sift")(x))
    with pytest.raises(ConfigError, match="needs its weights"):
        load_model("hardnet")
