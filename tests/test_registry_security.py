"""Registered models are data: tensors (safetensors) and a JSON card, rebuilt with ``create_model``.
A version an older patchflow logged as a pickle, or one planted by anyone who can write to the
tracking server, is refused with how to re-register it, and nothing in it runs."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from helpers import save_checkpoint
from pipeline import load_descriptor
from pipeline.checkpoint import save_state
from pipeline.cli import main
from pipeline.config import Config
from pipeline.data.shards import shard_paths
from pipeline.data.stream import load_pairs
from pipeline.models import create_model
from pipeline.pca import attach_pca, fit_pca
from pipeline.registry import (CARD_FILE, CHALLENGER, DESCRIPTOR_DIR, WEIGHTS_FILE, RegistryError, descriptor_from_directory,
                               register_checkpoint)
from pipeline.tracking import get_or_create_experiment
from test_checkpoint_security import _Payload


@pytest.fixture
def registry(tmp_path, monkeypatch, synthetic_shards):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    cfg = Config.model_validate({"data": {"shards": str(synthetic_shards), "eval_pairs": 256},
                                 "mlflow": {"tracking_uri": uri, "registered_model": f"sec-{uuid.uuid4().hex[:6]}-{{arch}}"}})
    client = MlflowClient(uri)
    run_id = client.create_run(get_or_create_experiment(client, "registry-security")).info.run_id
    return uri, cfg, client, run_id


def test_registered_models_are_tensors_and_a_card_and_load_back_exactly(registry, synthetic_shards, tmp_path):
    uri, cfg, client, run_id = registry
    pairs, labels, _ = load_pairs(shard_paths(synthetic_shards, "eval"), 256)
    torch.manual_seed(0)
    x = torch.rand(6, 1, 32, 32)
    # HardNet8 with its own fitted PCA head (64 of 512 dims), and HardNet with an attached PCA head
    own = create_model("hardnet8", pca_dim=64).eval()
    with torch.no_grad():
        own.set_pca(*fit_pca(create_model("hardnet8", pca_dim=None).eval()(torch.rand(128, 1, 32, 32)), 64))
    cfg8 = cfg.with_updates({"model.arch": "hardnet8", "model.pca_dim": 64})
    tower = create_model("hardnet").eval()
    with torch.no_grad():
        attached = attach_pca(tower, *fit_pca(tower(torch.rand(64, 1, 32, 32)), 16))
    for model, model_cfg, ckpt_model, folder in ((own, cfg8, own, "h8"), (attached, cfg, tower, "h")):
        ckpt = save_checkpoint(tmp_path / folder, ckpt_model, model_cfg)
        reg = register_checkpoint(model_cfg, ckpt, run_id, eval_pairs=(pairs, labels), model=model)
        uri_model = f"models:/{reg.model_name}@{CHALLENGER}"
        files = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri_model, dst_path=str(tmp_path / f"dl-{folder}")))
        card = json.loads((files / DESCRIPTOR_DIR / CARD_FILE).read_text())
        assert card["architecture"] == model_cfg.model.arch and card["descriptor_dim"] == model.descriptor_dim
        assert sorted(p.suffix for p in files.rglob("*") if p.is_file() and p.suffix in (".pkl", ".pth", ".pt")) == []
        assert set(yaml.safe_load((files / "MLmodel").read_text())["flavors"]) == {"patchflow", "python_function"}
        loaded = load_descriptor(uri_model, tracking_uri=uri)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
            torch.testing.assert_close(torch.from_numpy(mlflow.pyfunc.load_model(uri_model).predict(x.numpy())), model(x))
    assert not (tmp_path / "mlruns").exists()  # the models went to the run's experiment, not experiment 0's ./mlruns


def _plant_pickled_version(client: MlflowClient, run_id: str, name: str, target: Path, folder: Path, checkpoint: str = ""):
    """What an older patchflow logged (mlflow.pytorch, serialization_format="pickle"), with a payload."""
    model_dir = folder / "model"
    (model_dir / "data").mkdir(parents=True)
    torch.save(_Payload(str(target)), model_dir / "data" / "model.pth")
    (model_dir / "MLmodel").write_text(yaml.safe_dump({"artifact_path": "model", "flavors": {
        "pytorch": {"model_data": "data", "pytorch_version": str(torch.__version__)},
        "python_function": {"loader_module": "mlflow.pytorch", "data": "data"}}}))
    client.log_artifacts(run_id, str(model_dir), "model")
    client.create_registered_model(name)
    version = client.create_model_version(name, f"{client.get_run(run_id).info.artifact_uri}/model", run_id=run_id)
    if checkpoint:
        client.set_model_version_tag(name, version.version, "checkpoint", checkpoint)
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    assert not target.exists()


def test_a_pickled_version_is_refused_with_how_to_re_register_it(registry, synthetic_shards, tmp_path, capsys):
    uri, cfg, client, run_id = registry
    name, target = cfg.mlflow.model_name("hardnet"), tmp_path / "pwned"
    _plant_pickled_version(client, run_id, name, target, tmp_path / "planted", checkpoint="/runs/t1/checkpoint_000002")
    with pytest.raises(RegistryError, match=r"refused: logged by an older patchflow as a pickle.*"
                                            rf"patchflow register --checkpoint /runs/t1/checkpoint_000002 --name {name}"):
        load_descriptor(f"models:/{name}@{CHALLENGER}", tracking_uri=uri)
    capsys.readouterr()
    # the commands: one line, exit 2, nothing run
    assert main(["promote", "--model", name, "--shards", str(synthetic_shards), "--eval-pairs", "256"]) == 2
    assert main(["export", "--model", f"models:/{name}@{CHALLENGER}", "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("patchflow: error:")]  # (and MLflow's progress bars)
    assert len(err) == 2 and all(line.startswith(f"patchflow: error: models:/{name}@") and "re-register" in line for line in err), err
    assert not target.exists()


@pytest.mark.parametrize("edit, expected", [
    (lambda card: card.update(architecture="os.system"), "architecture 'os.system' is not one of"),
    (lambda card: card["factory_kwargs"].update(__class__="x"), "__class__ not an option of 'hardnet'"),
    (lambda card: card.update(loader="pickle"), "loader: Extra inputs are not permitted"),
    (lambda card: card.update(descriptor_dim=64), "says 32 px -> 64-d, the rebuilt model is 32 px -> 128-d"),
])
def test_a_tampered_card_is_refused_naming_what_is_wrong(tmp_path, edit, expected):
    from pipeline.registry import model_card, save_descriptor

    model = create_model("hardnet").eval()
    save_descriptor(model, model_card(model, "hardnet", {}), tmp_path)
    assert descriptor_from_directory(tmp_path, "v1").descriptor_dim == 128  # untouched: loads
    card = json.loads((tmp_path / CARD_FILE).read_text())
    edit(card)
    (tmp_path / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(RegistryError, match=f"^v1: .*{re.escape(expected)}"):
        descriptor_from_directory(tmp_path, "v1")
    assert (tmp_path / WEIGHTS_FILE).is_file()


def test_checkpoint_registers_from_the_command_line(registry, synthetic_shards, tmp_path, capsys):
    """``patchflow register --checkpoint`` (the way to re-register a pickled version) makes a loadable challenger."""
    uri, cfg, client, _ = registry
    torch.manual_seed(1)
    model = create_model("hardnet").eval()
    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_state(folder, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), epoch=1, step=4,
               mlflow_run_id=None, cfg=cfg)
    assert main(["register", "--checkpoint", str(folder), "--name", "sec-cli-hardnet"]) == 0
    assert "patchflow promote --model sec-cli-hardnet" in capsys.readouterr().out
    loaded = load_descriptor(f"models:/sec-cli-hardnet@{CHALLENGER}", tracking_uri=uri)
    x = torch.rand(4, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    version = client.get_model_version_by_alias("sec-cli-hardnet", CHALLENGER)
    assert version.tags["checkpoint"] == str(folder.resolve())
