"""Model registry: log the sweep's best model, register it, and move the ``champion`` alias only
when the new version beats the current champion on the same eval pairs, recomputed now (old
metrics may come from other data or code). MLflow 3: aliases, not stages.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.config import Config
from pipeline.data.shards import shard_paths
from pipeline.data.stream import load_pairs
from pipeline.evaluate import evaluate_pairs
from pipeline.tracking import resolve_tracking_uri
from pipeline.train import METRIC, model_from_checkpoint

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"


@dataclass
class Registration:
    model_name: str
    version: str
    run_id: str
    fpr95: float
    champion_version: str
    champion_fpr95: float | None  # the previous champion's FPR95 on the same pairs (None: there was none)
    promoted: bool


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=Path(__file__).parent).stdout.strip()
    except Exception:
        return "unknown"


def manifest_sha256(shard_dir: str | Path) -> str:
    return hashlib.sha256((Path(shard_dir) / "manifest.json").read_bytes()).hexdigest()


def load_descriptor(uri: str, tracking_uri: str | None = None) -> torch.nn.Module:
    """``models:/patchflow-hardnet@champion`` (or any MLflow model URI) -> nn.Module in eval mode,
    used like ``kornia.feature.HardNet``: ``(B,1,32,32)`` float in [0,1] -> ``(B,128)`` unit vectors."""
    import mlflow
    import mlflow.pytorch

    mlflow.set_tracking_uri(resolve_tracking_uri(tracking_uri))
    model = mlflow.pytorch.load_model(uri, map_location="cpu")
    return model.eval()


def _signature(model: torch.nn.Module):
    from mlflow.models import infer_signature

    size = model.input_size
    example = np.random.default_rng(0).random((2, 1, size, size), dtype=np.float32)
    with torch.no_grad():
        out = model.eval()(torch.from_numpy(example)).numpy()
    return infer_signature(example, out)


def register_checkpoint(
    cfg: Config,
    checkpoint_path: str,
    run_id: str,
    *,
    sweep_id: str = "",
    eval_pairs: tuple[np.ndarray, np.ndarray] | None = None,
) -> Registration:
    """Log the checkpoint's model to ``run_id``, register a new version (alias ``challenger``),
    and make it ``champion`` when there is none or it beats the champion on the same eval pairs."""
    import mlflow
    import mlflow.pytorch
    from mlflow.tracking import MlflowClient

    tracking_uri = resolve_tracking_uri(cfg.mlflow.tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    model, trained_cfg = model_from_checkpoint(checkpoint_path)
    name = cfg.mlflow.model_name(trained_cfg.model.arch)
    if eval_pairs is None:
        pairs, labels, _ = load_pairs(shard_paths(cfg.data.shards, "eval"), cfg.data.eval_pairs)
    else:
        pairs, labels = eval_pairs
    fpr = evaluate_pairs(model, pairs, labels)[METRIC]

    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            signature=_signature(model),
            serialization_format="pickle",  # loads back as the nn.Module (pt2 gives a frozen GraphModule)
            code_paths=[str(Path(__file__).parent)],  # the `pipeline` package, so the pickle loads anywhere
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "kornia==0.9.0", "numpy>=2,<3", "pydantic>=2.7,<3"],
            registered_model_name=name,
        )
        mlflow.log_metric("registered_eval_fpr95", fpr)
    version = str(info.registered_model_version)
    tags = {
        "architecture": trained_cfg.model.arch,
        "sweep_id": sweep_id,
        "data_manifest_sha256": manifest_sha256(cfg.data.shards),
        "eval_fpr95": f"{fpr:.6f}",
        "git_commit": _git_commit(),
        "input_size": str(model.input_size),
        "descriptor_dim": str(model.descriptor_dim),
        "pca_dim": str(getattr(model, "pca_dim", None)),
        "checkpoint": checkpoint_path,
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    client.set_registered_model_alias(name, CHALLENGER, version)

    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except mlflow.exceptions.MlflowException:
        champion = None
    champion_fpr = None
    if champion is not None and str(champion.version) != version:
        champion_model = mlflow.pytorch.load_model(f"models:/{name}@{CHAMPION}", map_location="cpu")
        champion_fpr = evaluate_pairs(champion_model, pairs, labels)[METRIC]
    promoted = champion is None or (champion_fpr is not None and fpr < champion_fpr)
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version)
    champion_version = version if promoted else str(champion.version)
    print(
        f"[patchflow] registered {name} v{version} (FPR95 {fpr:.4f}); champion "
        + (f"was v{champion.version} at {champion_fpr:.4f} on the same pairs; " if champion_fpr is not None else "was none; ")
        + (f"now v{version}" if promoted else f"stays v{champion_version}"),
        flush=True,
    )
    return Registration(name, version, run_id, fpr, champion_version, champion_fpr, promoted)
