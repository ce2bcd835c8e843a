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
from typing import Callable

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
    challenger_score: float  # the gate's metric (FPR95 on the eval split by default)
    champion_version: str | None  # before this promotion (None: there was none)
    champion_score: float | None  # re-evaluated on the same data
    promoted: bool
    reason: str
    metric: str = "FPR95"
    gate: str = ""  # the data it was decided on (Gate.label)

    @property
    def current_champion(self) -> str:
        return self.challenger_version if self.promoted else (self.champion_version or "")

    # the names before gates other than FPR95 existed: the gate's scores, whatever its metric
    @property
    def challenger_fpr95(self) -> float:
        return self.challenger_score

    @property
    def champion_fpr95(self) -> float | None:
        return self.champion_score


@dataclass(frozen=True)
class Gate:
    """What promotion ranks champion and challenger by: ``score`` maps {alias: model} to {alias:
    value} on one data set (both models scored together, so a benchmark's patches are cut once)."""

    label: str  # the data, in messages and tags ("4000 pairs", "images:/data/oxford_graf")
    metric: str  # "FPR95", "mma@3px", ...
    lower_is_better: bool
    score: Callable[[dict[str, torch.nn.Module]], dict[str, float]]
    data_sha256: str = ""  # the benchmark's content hash, recorded with the decision


def pairs_gate(pairs: np.ndarray, labels: np.ndarray) -> Gate:
    """The default gate: FPR95 on labelled eval pairs."""
    return Gate(f"{len(labels)} pairs", "FPR95", True,
                lambda models: {a: evaluate_pairs(m, pairs, labels)[METRIC] for a, m in models.items()})


PROMOTION_TAG = "promotion"  # prefix of the tags a decision leaves on the challenger version


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
    pairs: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    *,
    gate: Gate | None = None,
    min_improvement: float = 0.0,
    dry_run: bool = False,
    tracking_uri: str | None = None,
    challenger_fpr95: float | None = None,
) -> Promotion:
    """Re-evaluate ``challenger`` and ``champion`` on the same data — ``gate`` (a benchmark), by
    default FPR95 on ``pairs`` / ``labels`` — and move ``champion`` to the challenger only when it is
    better by at least ``min_improvement`` (a model without a champion gets one). The decision and
    both scores are tags ``promotion/*`` of the challenger version. Idempotent: a re-run finds
    challenger == champion and changes nothing; no version is ever created here."""
    import mlflow.pytorch
    from mlflow.tracking import MlflowClient

    default = gate is None
    if default:
        if pairs is None or labels is None:
            raise ValueError("promote needs eval pairs and labels, or a gate")
        gate = pairs_gate(pairs, labels)
    uri = resolve_tracking_uri(tracking_uri)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    challenger = _version_by_alias(client, model_name, CHALLENGER)
    if challenger is None:
        raise ValueError(f"{model_name}: no version has the alias {CHALLENGER!r}; register one first (patchflow sweep)")
    champion = _version_by_alias(client, model_name, CHAMPION)

    def model_of(alias: str) -> torch.nn.Module:
        return mlflow.pytorch.load_model(f"models:/{model_name}@{alias}", map_location="cpu")

    challenger_version = str(challenger.version)
    contest = champion is not None and str(champion.version) != challenger_version
    # ``challenger_fpr95``: already computed on these same pairs by the caller (right after registration)
    known = {CHALLENGER: challenger_fpr95} if challenger_fpr95 is not None and default else {}
    wanted = [a for a in ([CHALLENGER] + ([CHAMPION] if contest else [])) if a not in known]
    scores = known | gate.score({a: model_of(a) for a in wanted})
    challenger_score = scores[CHALLENGER]
    if champion is None:
        promoted, champion_score, reason = True, None, "there was no champion"
    elif not contest:
        promoted, champion_score, reason = False, challenger_score, "the challenger is already the champion"
    else:
        champion_score = scores[CHAMPION]
        gain = champion_score - challenger_score if gate.lower_is_better else challenger_score - champion_score
        promoted = gain > 0 and gain >= min_improvement
        reason = (f"{gate.metric} {'lower' if gate.lower_is_better else 'higher'} by {gain:.4f}"
                  + (f" >= {min_improvement:g}" if promoted else f", needs > 0 and >= {min_improvement:g}"))
    if promoted and not dry_run:
        client.set_registered_model_alias(model_name, CHAMPION, challenger_version)
    if not dry_run and (contest or champion is None):  # the decision, on the version it was about
        tags = {"gate": gate.label, "metric": gate.metric, "challenger_score": f"{challenger_score:.6f}",
                "champion_score": "none" if champion_score is None else f"{champion_score:.6f}",
                "champion_version": str(champion.version) if champion is not None else "none",
                "decision": "promoted" if promoted else f"kept v{champion.version}", "reason": reason}
        if gate.data_sha256:
            tags["data_sha256"] = gate.data_sha256
        for key, value in tags.items():
            client.set_model_version_tag(model_name, challenger_version, f"{PROMOTION_TAG}/{key}", value)
    verb = ("would move" if dry_run else "moved") if promoted else "keeps"
    target = f"v{challenger_version}" if promoted else (f"v{champion.version}" if champion else "none")
    print(
        f"[patchflow] {model_name}: challenger v{challenger_version} {gate.metric} {challenger_score:.4f} vs champion "
        + (f"v{champion.version} {champion_score:.4f}" if champion is not None else "none")
        + f" on {gate.label} -> {CHAMPION} {verb} {target} ({reason})",
        flush=True,
    )
    return Promotion(model_name, challenger_version, challenger_score, str(champion.version) if champion else None,
                     champion_score, promoted and not dry_run, reason, gate.metric, gate.label)
