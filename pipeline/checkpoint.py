"""Training checkpoints: one ``state.pt`` per reported epoch, holding the model, its fitted PCA head,
the optimizer, the position (epoch, step), the MLflow run id (a restarted worker logs into the same
run), every epoch's metrics so far (a resumed run logs what MLflow lacks) and the validated config
(the model can be rebuilt without the config file).

Checkpoints live on shared storage that other people and jobs write to, so they are data, not code:
they are read with ``torch.load(weights_only=True)``, which builds tensors, numbers, strings, lists
and dicts only and refuses a pickle that names anything else (a crafted ``state.pt`` cannot run code).
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from pipeline.config import Config
from pipeline.models import create_model
from pipeline.pca import attach_pca

CHECKPOINT_FILE = "state.pt"


class CheckpointError(ValueError):
    """A checkpoint folder that is missing, unreadable, or holds more than plain tensors and values."""


def build_model(cfg: Config) -> torch.nn.Module:
    return create_model(cfg.model.arch, **cfg.model.factory_kwargs())


def save_state(
    directory: Path, *, model, optimizer, epoch: int, step: int, mlflow_run_id: str | None, cfg: Config, pca=None,
    extra: dict[str, Any] | None = None,
    metrics: list[dict[str, Any]] | None = None,
) -> None:
    torch.save(
        {
            "model": model.state_dict(),
            "pca": pca,  # (components, mean) of an attached PCA head, or None
            "optimizer": optimizer.state_dict(),
            "epoch": epoch,
            "step": step,
            "mlflow_run_id": mlflow_run_id,
            "metrics": list(metrics or []),  # one dict per epoch up to this one, as logged to MLflow
            "config": cfg.model_dump(mode="json"),
            **(extra or {}),  # e.g. a time-budgeted run's step plan (pipeline.train)
        },
        directory / CHECKPOINT_FILE,
    )


def _refused_global(e: Exception) -> str | None:
    """``io.open`` out of torch's long weights-only message (which recommends allow-listing it: we do not);
    None when the pickle asks for no global (a damaged or foreign file)."""
    m = re.search(r"GLOBAL (\S+)", str(e))
    return m.group(1) if m else None


def load_state(checkpoint_dir: str | Path) -> dict[str, Any]:
    """The saved dict, read with ``weights_only=True`` (every entry is a tensor or a plain value).
    Raises ``CheckpointError`` naming the file for a missing file, a file that is not a checkpoint,
    and a pickle that asks for anything else (code is never run)."""
    path = Path(checkpoint_dir) / CHECKPOINT_FILE
    if not path.is_file():
        raise CheckpointError(f"{checkpoint_dir}: not a training checkpoint folder (expected a {CHECKPOINT_FILE} in it)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # what torch raises for a global outside its allow-list (and for garbage)
        refused = _refused_global(e)
        if refused is None:  # torch's reason is the first line after its long preamble
            reason = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
            raise CheckpointError(f"{path}: not a readable checkpoint ({reason})") from None
        raise CheckpointError(f"{path}: refused: it asks to load {refused}, not just tensors and plain values; "
                              f"loading it could run code (only checkpoints written by patchflow's training are accepted)") from None
    except Exception as e:  # truncated or foreign files: zip / pickle errors of many types
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    missing = [k for k in ("model", "optimizer", "epoch", "step", "config") if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a patchflow checkpoint (missing {', '.join(missing)})")
    return state


def model_from_checkpoint(checkpoint_dir: str | Path) -> tuple[torch.nn.Module, Config]:
    """The trained model in eval mode, with its PCA head attached when the run fitted one."""
    state = load_state(checkpoint_dir)
    path = Path(checkpoint_dir) / CHECKPOINT_FILE
    try:
        cfg = Config.model_validate(state["config"])
    except ValidationError as e:
        raise CheckpointError(f"{path}: its config is not valid for this version of patchflow: "
                              f"{e.errors(include_url=False)[0]['msg']}") from None
    model = build_model(cfg)
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, TypeError) as e:
        raise CheckpointError(f"{path}: the weights do not fit a {cfg.model.arch!r} model built from its config: "
                              f"{str(e).splitlines()[0]}") from None
    if state.get("pca") is not None:
        model = attach_pca(model, *state["pca"])
    return model.eval(), cfg
