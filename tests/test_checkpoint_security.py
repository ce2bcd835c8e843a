"""Checkpoints are data: a real one (PCA head, SGD momentum, carried metrics) loads with
``weights_only=True``; a planted ``state.pt`` whose pickle would run code is refused, naming the file,
by every command that reads checkpoints, and its code never runs."""

from __future__ import annotations

import builtins
import pickle
import re

import pytest
import torch

from pipeline.checkpoint import CHECKPOINT_FILE, CheckpointError, load_state, model_from_checkpoint, save_state
from pipeline.cli import main
from pipeline.config import Config
from pipeline.models import create_model
from pipeline.pca import attach_pca, fit_pca


class _Payload:
    """Unpickling this calls ``open(target, "w")``: a file appears if the pickle is ever run."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return builtins.open, (self.target, "w")


def plant(folder, target) -> str:
    folder.mkdir()
    torch.save({"model": {"w": torch.zeros(1)}, "optimizer": {}, "epoch": 0, "step": 0, "config": {},
                "payload": _Payload(str(target))}, folder / CHECKPOINT_FILE)
    assert not target.exists()
    return str(folder)


def test_a_real_checkpoint_with_pca_and_momentum_loads_weights_only(tmp_path):
    torch.manual_seed(0)
    cfg = Config.model_validate({"data": {"shards": "unused"}, "model": {"arch": "hardnet", "pca_dim": 16}})
    model = create_model("hardnet")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):  # two steps: every parameter has a momentum buffer
        optimizer.zero_grad()
        model(torch.rand(8, 1, 32, 32)).pow(2).sum().backward()
        optimizer.step()
    model.eval()
    pca = fit_pca(model(torch.rand(64, 1, 32, 32)).detach(), 16)
    metrics = [{"epoch": 1, "eval_fpr95": 0.25, "mlflow_run_id": "abc", "pairs_per_s": float("nan")}]
    save_state(tmp_path, model=model, optimizer=optimizer, epoch=0, step=2, mlflow_run_id="abc", cfg=cfg, pca=pca,
               metrics=metrics)

    raw = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)  # torch itself accepts it as plain data
    state = load_state(tmp_path)
    assert state.keys() == raw.keys() and state["metrics"][0]["eval_fpr95"] == 0.25 and state["step"] == 2
    restored = torch.optim.SGD(create_model("hardnet").parameters(), lr=0.1, momentum=0.9)
    restored.load_state_dict(state["optimizer"])
    for p, buf in zip(model.parameters(), (s["momentum_buffer"] for s in restored.state_dict()["state"].values())):
        torch.testing.assert_close(buf, optimizer.state[p]["momentum_buffer"], rtol=0, atol=0)
    loaded, loaded_cfg = model_from_checkpoint(tmp_path)
    x = torch.rand(5, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), attach_pca(model, *pca)(x))
    assert loaded_cfg == cfg and loaded.descriptor_dim == 16


def test_a_planted_checkpoint_is_refused_and_runs_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    target = tmp_path / "pwned"
    ckpt = plant(tmp_path / "ckpt", target)
    with pytest.raises(pickle.UnpicklingError):  # the file does ask for code: torch's own refusal
        torch.load(f"{ckpt}/{CHECKPOINT_FILE}", weights_only=True)
    with pytest.raises(CheckpointError, match=re.escape(f"{ckpt}/{CHECKPOINT_FILE}: refused: it asks to load ") + r"\S*open"):
        load_state(ckpt)
    with pytest.raises(CheckpointError, match="refused"):
        model_from_checkpoint(ckpt)
    # every command that reads a checkpoint: one line, exit 2 (bad input), nothing run
    for argv in (["export", "--model", ckpt, "--format", "onnx", "--out", str(tmp_path / "x.onnx")],
                 ["register", "--checkpoint", ckpt],
                 ["evaluate", "--images", str(tmp_path), "--model", ckpt, "--no-mlflow"]):
        assert main(argv) == 2, argv
    assert not target.exists()


@pytest.mark.parametrize("content, expected", [
    (None, "not a training checkpoint folder"),
    (b"not a zip, not a pickle", "not a readable checkpoint"),
    ({"model": {}}, "not a patchflow checkpoint (missing optimizer, epoch, step, config)"),
])
def test_what_is_not_a_checkpoint_gets_one_line_naming_it(tmp_path, content, expected):
    if isinstance(content, bytes):
        (tmp_path / CHECKPOINT_FILE).write_bytes(content)
    elif content is not None:
        torch.save(content, tmp_path / CHECKPOINT_FILE)
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(tmp_path))}.*{re.escape(expected)}"):
        load_state(tmp_path)
