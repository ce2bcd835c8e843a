"""Model registry: log the sweep's best model, register it, and move the ``champion`` alias only
when the new version beats the current champion on the same eval pairs, recomputed now (old
metrics may come from other data or code). MLflow 3: aliases, not stages.

Registered models are data, not code: anyone who can write to the tracking server can add a
version, so a version holds tensors and a JSON card, nothing that runs when it is loaded::

    model/MLmodel                       flavors "patchflow" (format, files) and "python_function"
    model/descriptor/model.safetensors  the state dict, PCA buffers included (safetensors: no code)
    model/descriptor/model_card.json    architecture, factory arguments, PCA head, sizes, versions

``load_descriptor`` (and ``promote``, ``evaluate --model``, ``export --model`` through it) reads the
card, rebuilds the module with ``create_model`` from this installed package, and loads the tensors
into it. ``mlflow.pyfunc.load_model`` works too: its loader is this module's ``_load_pyfunc``. A
version logged by an older patchflow (a pickle) is refused with the command that re-registers it.
"""

from __future__ import annotations

import logging
import re
import subprocess
import tempfile
from dataclasses import dataclass
from importlib.metadata import requires, version as package_version
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Literal

import numpy as np
import torch
import yaml
from packaging.requirements import Requirement
from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.checkpoint import model_from_checkpoint
from pipeline.config import Config
from pipeline.data.shards import manifest_sha256 as _manifest_sha256
from pipeline.data.stream import load_eval_split
from pipeline.evaluate import METRIC, evaluate_pairs, pair_distances
from pipeline.metrics import fpr_at_95_recall
from pipeline.models import create_model, list_models, model_options
from pipeline.pca import PCAAttached, PCAProjection, pca_head_dim
from pipeline.tracking import resolve_tracking_uri

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
FLAVOR = "patchflow"
CARD_FORMAT = "patchflow-descriptor/1"
DESCRIPTOR_DIR = "descriptor"  # inside the logged model: the card and the tensors
CARD_FILE, WEIGHTS_FILE = "model_card.json", "model.safetensors"


class RegistryError(ValueError):
    """A registered model, alias or version that cannot be used: not there, or not a patchflow tensor model."""


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


# What a logged model needs to load and run (besides patchflow itself): these packages, as pyproject.toml pins them.
MODEL_PACKAGES = ("torch", "kornia", "numpy", "pydantic", "safetensors")


def model_requirements() -> list[str]:
    """pip requirements of a logged model: patchflow's own pins of ``MODEL_PACKAGES`` (read from the
    installed package's metadata, so pyproject.toml stays their one home)."""
    reqs = [Requirement(spec) for spec in requires("patchflow") or []]
    declared = {r.name.lower(): str(r) for r in reqs if r.marker is None}  # markers: extras' requirements
    missing = [p for p in MODEL_PACKAGES if p not in declared]
    if missing:
        raise RuntimeError(f"patchflow's installed metadata declares no {', '.join(missing)}: reinstall it (pip install -e .)")
    return [declared[p] for p in MODEL_PACKAGES]


class ModelCard(BaseModel):
    """``model_card.json``: what ``create_model`` needs to rebuild the module the tensors belong to."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["patchflow-descriptor/1"]
    architecture: str
    factory_kwargs: dict[str, int | float | str | bool | None]  # create_model(architecture, **factory_kwargs)
    pca: Literal["none", "attached", "own"]  # attached: a PCAAttached head (pca.components, pca.mean) on the tower
    pca_dim: int | None  # the head's output dim
    input_size: int
    descriptor_dim: int
    kind: str
    patchflow_version: str
    weights: Literal["model.safetensors"]


def model_card(model: torch.nn.Module, arch: str, factory_kwargs: dict[str, Any]) -> ModelCard:
    """The card of ``model`` (a ``create_model(arch, **factory_kwargs)`` tower, possibly with a PCA head)."""
    core = model.backbone if isinstance(model, PCAAttached) else model
    kwargs = dict(factory_kwargs)
    if core.info.pca == "own" and core.pca_dim is not None:
        kwargs["pca_dim"] = core.pca_dim  # HardNet8: the fitted head's dim, which set_pca may have changed
    pca = "attached" if isinstance(model, PCAAttached) else ("own" if pca_head_dim(core) is not None else "none")
    return ModelCard(format=CARD_FORMAT, architecture=arch, factory_kwargs=kwargs, pca=pca, pca_dim=pca_head_dim(model),
                     input_size=model.input_size, descriptor_dim=model.descriptor_dim, kind=model.info.kind,
                     patchflow_version=package_version("patchflow"), weights=WEIGHTS_FILE)


def save_descriptor(model: torch.nn.Module, card: ModelCard, directory: str | Path) -> Path:
    """Write ``directory/model.safetensors`` (the state dict) and ``directory/model_card.json``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": CARD_FORMAT})
    (directory / CARD_FILE).write_text(card.model_dump_json(indent=2) + "\n")
    return directory


def descriptor_from_directory(directory: str | Path, source: str) -> torch.nn.Module:
    """Rebuild the module a card describes and load its tensors (nothing in the folder is executed or
    unpickled). ``source`` names the model in errors. Raises ``RegistryError``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    card_path = directory / CARD_FILE
    try:
        card = ModelCard.model_validate_json(card_path.read_text())
    except OSError as e:
        raise RegistryError(f"{source}: {CARD_FILE} unreadable ({e})") from None
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        raise RegistryError(f"{source}: {CARD_FILE}: {'.'.join(map(str, err['loc'])) or 'card'}: {err['msg']}") from None
    arch = card.architecture
    if arch not in list_models():
        raise RegistryError(f"{source}: {CARD_FILE}: architecture {arch!r} is not one of {', '.join(list_models())}")
    unknown = set(card.factory_kwargs) - set(model_options(arch))
    if unknown:
        raise RegistryError(f"{source}: {CARD_FILE}: {', '.join(sorted(unknown))} not an option of {arch!r}")
    try:
        model = create_model(arch, **card.factory_kwargs)
        if card.pca == "attached":
            if card.pca_dim is None:
                raise ValueError("pca 'attached' needs pca_dim")
            d = model.descriptor_dim
            model = PCAAttached(model, PCAProjection(torch.zeros(card.pca_dim, d), torch.zeros(d)))
        tensors = load_file(str(directory / WEIGHTS_FILE))
        model.load_state_dict(tensors, strict=True)
    except (ValueError, TypeError, RuntimeError, OSError, SafetensorError) as e:
        raise RegistryError(f"{source}: its tensors do not load into the {arch!r} model its card describes: "
                            f"{str(e).strip().splitlines()[0]}") from None
    if (model.input_size, model.descriptor_dim) != (card.input_size, card.descriptor_dim):
        raise RegistryError(f"{source}: {CARD_FILE} says {card.input_size} px -> {card.descriptor_dim}-d, the rebuilt "
                            f"model is {model.input_size} px -> {model.descriptor_dim}-d")
    return model.eval()


_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


def _old_format_error(uri: str, client) -> RegistryError:
    """The refusal of a pickled version, with the command that re-registers it from its checkpoint."""
    hint = "patchflow register --checkpoint CHECKPOINT_DIR (the checkpoint it came from), or re-run its sweep"
    m = _MODEL_URI.match(uri)
    if m:
        try:
            v = (client.get_model_version_by_alias(m["name"], m["alias"]) if m["alias"]
                 else client.get_model_version(m["name"], m["version"]))
            if v.tags.get("checkpoint"):
                hint = f"patchflow register --checkpoint {v.tags['checkpoint']} --name {m['name']} (its checkpoint), or re-run its sweep"
        except Exception:  # noqa: BLE001 - the hint without the path
            pass
    return RegistryError(f"{uri}: refused: logged by an older patchflow as a pickle, which could run code when loaded; "
                         f"re-register it as tensors: {hint}")


def load_descriptor(uri: str, tracking_uri: str | None = None) -> torch.nn.Module:
    """``models:/patchflow-hardnet@champion`` (or any MLflow model URI) -> nn.Module in eval mode,
    used like ``kornia.feature.HardNet``: ``(B,1,32,32)`` float in [0,1] -> ``(B,128)`` unit vectors.

    The version's files are downloaded and read as data (a JSON card and safetensors): the module is
    this package's ``create_model`` with those tensors. Raises ``RegistryError`` for a URI that names
    nothing and for a version that is not a patchflow tensor model (an old pickled one included)."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri_tracking = resolve_tracking_uri(tracking_uri)
    mlflow.set_tracking_uri(uri_tracking)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp, tracking_uri=uri_tracking))
        except MlflowException as e:
            if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
                raise RegistryError(f"{uri}: no such model at {uri_tracking} ({str(e).splitlines()[0]})") from None
            raise
        if (local / DESCRIPTOR_DIR / CARD_FILE).is_file():
            return descriptor_from_directory(local / DESCRIPTOR_DIR, uri)
        flavors = {}
        if (local / "MLmodel").is_file():
            flavors = (yaml.safe_load((local / "MLmodel").read_text()) or {}).get("flavors") or {}
        if "pytorch" in flavors:
            raise _old_format_error(uri, MlflowClient(uri_tracking))
        raise RegistryError(f"{uri}: not a patchflow model (no {DESCRIPTOR_DIR}/{CARD_FILE}; flavors: "
                            f"{', '.join(flavors) or 'none'})")


class _PyfuncDescriptor:
    """What ``mlflow.pyfunc.load_model`` returns for a patchflow model: ``predict`` on (B, 1, S, S) floats."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def predict(self, model_input, params=None) -> np.ndarray:
        with torch.no_grad():
            return self.model(torch.as_tensor(np.asarray(model_input, dtype=np.float32))).numpy()


def _load_pyfunc(path: str) -> _PyfuncDescriptor:
    """MLflow's pyfunc loader (``loader_module: pipeline.registry`` in the MLmodel file)."""
    return _PyfuncDescriptor(descriptor_from_directory(path, path))


def _save_model(path: str, mlflow_model, *, model: torch.nn.Module, card: ModelCard, signature=None) -> None:
    """The flavor's ``save_model`` (called by ``mlflow.models.Model.log``): tensors, card, MLmodel."""
    import mlflow.pyfunc

    root = Path(path)
    save_descriptor(model, card, root / DESCRIPTOR_DIR)
    (root / "requirements.txt").write_text("\n".join([f"patchflow=={card.patchflow_version}", *model_requirements()]) + "\n")
    mlflow_model.signature = signature
    mlflow_model.add_flavor(FLAVOR, format=CARD_FORMAT, card=f"{DESCRIPTOR_DIR}/{CARD_FILE}",
                            weights=f"{DESCRIPTOR_DIR}/{WEIGHTS_FILE}", architecture=card.architecture)
    mlflow.pyfunc.add_to_model(mlflow_model, loader_module="pipeline.registry", data=DESCRIPTOR_DIR)
    mlflow_model.save(str(root / "MLmodel"))


_FLAVOR_MODULE = SimpleNamespace(__name__=FLAVOR, save_model=_save_model)  # what Model.log calls a flavor module


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

    from mlflow.models import Model

    card = model_card(model, trained_cfg.model.arch, trained_cfg.model.factory_kwargs())
    with mlflow.start_run(run_id=run_id):  # the logged model joins the run's experiment, not experiment 0's ./mlruns
        info = Model.log(None, _FLAVOR_MODULE, name="model", run_id=run_id, registered_model_name=name,
                         model=model, card=card, signature=_signature(model))
    client.log_metric(run_id, f"registered_{METRIC}", fpr)
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
        "pca_fit": trained_cfg.model.pca_fit if isinstance(model, PCAAttached) else ("pca" if pca_head_dim(model) else "none"),
        "checkpoint": checkpoint_path,
        "data_shards": str(cfg.data.shards),
        "model_format": CARD_FORMAT,
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    client.set_registered_model_alias(name, CHALLENGER, version)
    print(f"[patchflow] registered {name} v{version} (eval FPR95 {fpr:.4f}) as {CHALLENGER}", flush=True)
    return Registration(name, version, run_id, fpr, distances)


def registered_version(client, name: str, alias: str, *, required: bool = True):
    """The version of ``name`` that has ``alias``; None when none has it and not ``required``.
    ``RegistryError`` for an unknown model name (listing some that exist) and a missing required alias."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        known = [m.name for m in client.search_registered_models(max_results=20)]
        raise RegistryError(f"{name}: no registered model of that name at {client.tracking_uri} "
                            f"(registered: {', '.join(known) or 'none'})") from None
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        if required:
            raise RegistryError(f"{name}: no version has the alias {alias!r}; register one first "
                                f"(patchflow sweep, or patchflow register --checkpoint DIR)") from None
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
    from mlflow.tracking import MlflowClient

    default = gate is None
    if default:
        if pairs is None or labels is None:
            raise ValueError("promote needs eval pairs and labels, or a gate")
        gate = pairs_gate(pairs, labels)
    uri = resolve_tracking_uri(tracking_uri)
    client = MlflowClient(uri)
    challenger = registered_version(client, model_name, CHALLENGER)
    champion = registered_version(client, model_name, CHAMPION, required=False)

    def model_of(alias: str) -> torch.nn.Module:
        return load_descriptor(f"models:/{model_name}@{alias}", tracking_uri=uri)

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
