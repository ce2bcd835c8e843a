"""Training checkpoints: one ``state.pt`` per reported epoch, holding the model, its fitted PCA head,
the optimizer, the position (epoch, step), the MLflow run id (a restarted worker logs into the same
run) and the validated config (the model can be rebuilt without the config file)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline.config import Config
from pipeline.models import create_model
from pipeline.pca import attach_pca

CHECKPOINT_FILE = "state.pt"


def build_model(cfg: Config) -> torch.nn.Module:
    return create_model(cfg.model.arch, **cfg.model.factory_kwargs())


def save_state(
    directory: Path, *, model, optimizer, epoch: int, step: int, mlflow_run_id: str | None, cfg: Config, pca=None,
    extra: dict[str, Any] | None = None,
) -> None:
    torch.save(
        {
            "model": model.state_dict(),
            "pca": pca,  # (components, mean) of an attached PCA head, or None
            "optimizer": optimizer.state_dict(),
            "epoch": epoch,
            "step": step,
            "mlflow_run_id": mlflow_run_id,
            "config": cfg.model_dump(mode="json"),
            **(extra or {}),  # e.g. a time-budgeted run's step plan (pipeline.train)
        },
        directory / CHECKPOINT_FILE,
    )


def load_state(checkpoint_dir: str | Path) -> dict[str, Any]:
    """The saved dict. The one place a checkpoint is unpickled (``weights_only=False``: the PCA
    tuple and the config dict are plain Python objects)."""
    return torch.load(Path(checkpoint_dir) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)


def model_from_checkpoint(checkpoint_dir: str | Path) -> tuple[torch.nn.Module, Config]:
    """The trained model in eval mode, with its PCA head attached when the run fitted one."""
    state = load_state(checkpoint_dir)
    cfg = Config.model_validate(state["config"])
    model = build_model(cfg)
    model.load_state_dict(state["model"])
    if state.get("pca") is not None:
        model = attach_pca(model, *state["pca"])
    return model.eval(), cfg
