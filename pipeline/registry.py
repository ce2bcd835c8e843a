"""Model registry: log the sweep's best model, register it, and move the ``champion`` alias only
when the new version beats the current champion on the same eval pairs, recomputed now (old
metrics may come from other data or code). MLflow 3: aliases, not stages.
"""

from __future__ import annotations

import logging
import subprocess
from dataclasses import dataclass
from importlib.metadata import requires
from pathlib import Path

import numpy as np
import torch
from packaging.requirements import Requirement

from pipeline.checkpoint import model_from_checkpoint
from pipeline.config import Config
from pipeline.data.shards import manifest_sha256 as _manifest_sha256
from pipeline.data.stream import load_eval_split
from pipeline.evaluate import METRIC, evaluate_pairs, pair_distances
from pipeline.metrics import fpr_at_95_recall
from pipeline.pca import pca_head_dim
from pipeline.tracking import resolve_tracking_uri

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"


@dataclass
class Registration:
    model_name: str
    version: str
    run_id: str
    fpr95: float
    distances: np.ndarray | None = None  # on the eval pairs it was scored on (for plots)


@dataclass
class Promotion:
    model_name: str
    challenger_version: str
    challenger_fpr95: float
    champion_version: str | None  # before this promotion (None: there was none)
    champion_fpr95: float | None  # re-evaluated on the same pairs
    promoted: bool
    reason: str

    @property
    def current_champion(self) -> str:
        return self.challenger_version if self.promoted else (self.champion_version or "")


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=Path(__file__).parent).stdout.strip()
    except Exception:
        return "unknown"


def manifest_sha256(shard_dir: str | Path) -> str:
    return _manifest_sha256(shard_dir)  # local, http(s)://, s3://, gs://


# What a logged model needs to unpickle and run: these packages, as pyproject.toml pins them.
MODEL_PACKAGES = ("torch", "kornia", "numpy", "pydantic")


def model_requirements() -> list[str]:
    """pip requirements of a logged model: patchflow's own pins of ``MODEL_PACKAGES`` (read from the
    installed package's metadata, so pyproject.toml stays their one home)."""
    reqs = [Requirement(spec) for spec in requires("patchflow") or []]
    declared = {r.name.lower(): str(r) for r in reqs if r.marker is None}  # markers: extras' requirements
    missing = [p for p in MODEL_PACKAGES if p not in declared]
    if missing:
        raise RuntimeError(f"patchflow's installed metadata declares no {', '.join(missing)}: reinstall it (pip install -e .)")
    return [declared[p] for p in MODEL_PACKAGES]


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
    model: torch.nn.Module | None = None,
) -> Registration:
    """Log the checkpoint's model to ``run_id`` and register it as a new version with alias
    ``challenger`` (``promote`` decides about ``champion``)."""
    import mlflow
    import mlflow.pytorch
    from mlflow.tracking import MlflowClient

    tracking_uri = resolve_tracking_uri(cfg.mlflow.tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    trained, trained_cfg = model_from_checkpoint(checkpoint_path)
    model = trained if model is None else model.eval()  # e.g. the tower with a PCA head attached
    name = cfg.mlflow.model_name(trained_cfg.model.arch)
    if eval_pairs is None:
        pairs, labels, _ = load_eval_split(cfg.data)
    else:
        pairs, labels = eval_pairs
    distances = pair_distances(model, pairs)
    fpr = fpr_at_95_recall(distances, labels)

    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            signature=_signature(model),
            serialization_format="pickle",  # loads back as the nn.Module (pt2 gives a frozen GraphModule)
            code_paths=[str(Path(__file__).parent)],  # the `pipeline` package, so the pickle loads anywhere
            pip_requirements=model_requirements(),
            registered_model_name=name,
        )
        mlflow.log_metric(f"registered_{METRIC}", fpr)
    version = str(info.registered_model_version)
    tags = {
        "architecture": trained_cfg.model.arch,
        "sweep_id": sweep_id,
        "data_manifest_sha256": manifest_sha256(cfg.data.shards),
        METRIC: f"{fpr:.6f}",
        "git_commit": _git_commit(),
        "input_size": str(model.input_size),
        "descriptor_dim": str(model.descriptor_dim),
        "pca_dim": str(pca_head_dim(model) or trained_cfg.model.pca_dim),
        "checkpoint": checkpoint_path,
        "data_shards": str(cfg.data.shards),
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    client.set_registered_model_alias(name, CHALLENGER, version)
    print(f"[patchflow] registered {name} v{version} (eval FPR95 {fpr:.4f}) as {CHALLENGER}", flush=True)
    return Registration(name, version, run_id, fpr, distances)


def _version_by_alias(client, name: str, alias: str):
    import mlflow

    try:
        return client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:
        return None


def promote(
    model_name: str,
    pairs: np.ndarray,
    labels: np.ndarray,
    *,
    min_improvement: float = 0.0,
    dry_run: bool = False,
    tracking_uri: str | None = None,
    challenger_fpr95: float | None = None,
) -> Promotion:
    """Re-evaluate ``challenger`` and ``champion`` on the same pairs; move ``champion`` to the
    challenger only when its FPR95 is lower by at least ``min_improvement`` (a model without a
    champion gets one). Idempotent: a re-run finds challenger == champion and changes nothing;
    no version is ever created here."""
    import mlflow.pytorch
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    challenger = _version_by_alias(client, model_name, CHALLENGER)
    if challenger is None:
        raise ValueError(f"{model_name}: no version has the alias {CHALLENGER!r}; register one first (patchflow sweep)")
    champion = _version_by_alias(client, model_name, CHAMPION)

    def fpr_of(alias: str) -> float:
        model = mlflow.pytorch.load_model(f"models:/{model_name}@{alias}", map_location="cpu")
        return evaluate_pairs(model, pairs, labels)[METRIC]

    # ``challenger_fpr95``: already computed on these same pairs by the caller (right after registration)
    challenger_fpr = fpr_of(CHALLENGER) if challenger_fpr95 is None else challenger_fpr95
    challenger_version = str(challenger.version)
    if champion is None:
        promoted, champion_fpr, reason = True, None, "there was no champion"
    elif str(champion.version) == challenger_version:
        promoted, champion_fpr, reason = False, challenger_fpr, "the challenger is already the champion"
    else:
        champion_fpr = fpr_of(CHAMPION)
        gain = champion_fpr - challenger_fpr
        promoted = gain > 0 and gain >= min_improvement
        reason = (f"FPR95 lower by {gain:.4f}" + (f" >= {min_improvement:g}" if promoted else f", needs > 0 and >= {min_improvement:g}"))
    if promoted and not dry_run:
        client.set_registered_model_alias(model_name, CHAMPION, challenger_version)
    verb = ("would move" if dry_run else "moved") if promoted else "keeps"
    target = f"v{challenger_version}" if promoted else (f"v{champion.version}" if champion else "none")
    print(
        f"[patchflow] {model_name}: challenger v{challenger_version} FPR95 {challenger_fpr:.4f} vs champion "
        + (f"v{champion.version} {champion_fpr:.4f}" if champion is not None else "none")
        + f" on {len(labels)} pairs -> {CHAMPION} {verb} {target} ({reason})",
        flush=True,
    )
    return Promotion(model_name, challenger_version, challenger_fpr, str(champion.version) if champion else None,
                     champion_fpr, promoted and not dry_run, reason)
