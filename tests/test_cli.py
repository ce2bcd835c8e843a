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
from test_evaluation import small_sequence
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


def test_evaluate_images_command(tmp_path, monkeypatch, capsys):
    """The command's wiring: its table prints what its MLflow run holds, and --redetect, --seed and
    --construction reach the pairs. (The figures are checked against a recomputation in
    tests/test_evaluation.py.)"""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    torch.manual_seed(0)
    seq = small_sequence(tmp_path / "camera")
    ckpt = save_checkpoint(tmp_path / "ckpt", create_model("hardnet"), Config.model_validate({"data": {"shards": "unused"}}))
    args = ["evaluate", "--images", str(seq), "--model", ckpt, "--construction", "harris-upright", "--pairs", "60",
            "--max-keypoints", "150", "--seed", "3", "--no-matching", "--no-baselines"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    for redetect in (False, True):
        assert main(args + (["--redetect"] if redetect else [])) == 0
        out = capsys.readouterr().out
        run = client.search_runs([client.get_experiment_by_name("patchflow-evaluation").experiment_id],
                                 order_by=["attributes.start_time DESC"])[0]
        p = run.data.params
        assert (p["redetect"], p["seed"], p["split"], p["pairs_per_sequence"]) == (str(redetect), "3", "harris-upright", "60")
        m = run.data.metrics
        for name, key in ((r"sift \(kornia\)", "sift"), (re.escape(ckpt), "model1")):
            cell = rf"{m[f'{key}/harris-upright/fpr95']:.3f} \[{m[f'{key}/harris-upright/fpr95_low']:.3f}, "
            assert re.search(rf"^{name}\s+{cell}", out, re.M), out
        assert "Image matching" not in out and run.info.run_id in out and "OpenCV" not in out

    # usage errors: one line, exit 2, before anything is read
    for extra, message in ((["--split", "a"], "--split: applies to --phototour and --hpatches"),
                           (["--construction", "dog-sideways"], "unknown pair construction 'dog-sideways'")):
        assert main(["evaluate", "--images", str(seq), "--no-mlflow", *extra]) == 2
        assert message in capsys.readouterr().err
    assert main(["evaluate", "--phototour", str(seq), "--pairs", "10"]) == 2
    assert "--pairs: applies to --images only" in capsys.readouterr().err


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
