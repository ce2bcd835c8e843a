"""Typed run configuration, loaded from YAML and validated before anything starts.

Every problem in a file (unknown key, wrong type, out-of-range value, more workers than the
machine has) is reported in one ``ConfigError`` whose lines name the file, the dotted key, what
was expected and what was found. Relative paths are resolved against the working directory at
load time: Ray workers run in Ray's session folder, so they only ever see absolute paths.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.budget import parse_duration
from pipeline.data.hpatches import SPLIT_NAMES as HPATCHES_SPLITS
from pipeline.device import gpu_count
from pipeline.losses import DEFAULT_MARGIN, PAIR_LOSSES, HardCandidates, LossName, Negatives
from pipeline.models import create_model, list_models, model_info, model_options


class ConfigError(ValueError):
    """A configuration problem, raised before Ray or MLflow start."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    shards: str = Field(description="folder with manifest.json and the train/eval .tar shards")
    shuffle_buffer: int = Field(4096, ge=0, description="pairs held in the in-memory shuffle buffer")
    loader_workers: int = Field(0, ge=0, description="DataLoader worker processes per rank")
    verify_checksums: bool = Field(True, description="check every shard's sha256 against the manifest before training")
    on_bad_checksum: Literal["error", "skip"] = Field("error", description="refuse to train, or leave the shard out")
    eval_pairs: int | None = Field(None, ge=2, description="cap on eval pairs (None = all)")
    on_short_eval: Literal["error", "skip"] = Field(
        "error", description="an eval shard gave fewer pairs than its manifest lists: refuse, or evaluate on what was read")


class ModelConfig(_Strict):
    """``arch`` names a registered model (``pipeline.models.list_models()``); the other keys are
    its factory's keyword arguments, left out (None) for the factory's default."""

    arch: str = "hardnet"
    dropout: float | None = Field(None, ge=0.0, lt=1.0)
    pca_dim: int | None = Field(None, ge=2, description="embedding models: PCA head fitted on training descriptors")
    pca_fit: Literal["pca", "learned_whitening"] = Field(
        "pca", description="how an attached pca_dim head is fitted: PCA, or learned whitening (whiten the matching "
                           "pairs' differences, then PCA; pipeline.pca.fit_learned_whitening)")
    input_size: int | None = Field(None, ge=8)
    descriptor_dim: int | None = Field(None, ge=2)
    patch_size: int | None = Field(None, ge=8)

    @model_validator(mode="after")
    def _known_arch_and_options(self) -> "ModelConfig":
        if self.arch not in list_models():
            raise ValueError(f"arch: expected one of {', '.join(list_models())}, got {self.arch!r}")
        accepted = set(model_options(self.arch))
        for key in self.factory_kwargs():
            if key not in accepted:
                raise ValueError(f"{key}: not an option of {self.arch!r} (its options: {', '.join(sorted(accepted)) or 'none'})")
        info = model_info(self.arch)
        if self.pca_dim is not None and info.pca == "none":
            raise ValueError(f"pca_dim: {self.arch!r} is not a trainable embedding model; PCA does not apply")
        if self.pca_fit != "pca" and self.attached_pca_dim is None:
            raise ValueError(f"pca_fit: {self.pca_fit!r} fits the head the pipeline attaches, which needs model.pca_dim "
                             f"and an architecture without its own PCA ({self.arch!r}'s: {info.pca})")
        if self.attached_pca_dim is not None:
            dim = self.descriptor_dim or info.descriptor_dim
            if self.pca_dim > dim:
                raise ValueError(f"pca_dim: expected at most {dim} ({self.arch}'s descriptor size), got {self.pca_dim}")
        return self

    def factory_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for the model's class; ``pca_dim`` only where the model has its own
        PCA head (HardNet8) — for the others the pipeline attaches one after training."""
        own_pca = model_info(self.arch).pca == "own"
        return {k: v for k, v in self.model_dump().items()
                if k not in ("arch", "pca_fit") and v is not None and (k != "pca_dim" or own_pca)}

    @property
    def attached_pca_dim(self) -> int | None:
        """The PCA dimension the pipeline attaches (None when the model handles PCA itself)."""
        return self.pca_dim if model_info(self.arch).pca == "attach" else None


class LossConfig(_Strict):
    name: LossName | None = Field(None, description="None = the architecture's default (pipeline.models.model_info(arch).default_loss)")
    margin: float = Field(DEFAULT_MARGIN, gt=0.0)
    anchor_swap: bool = True
    scale: float = Field(1.0, gt=0.0, description="l2net_relative: S = exp(scale * (2 - D)); 1 = the L2-Net paper's")
    relative_margin: float = Field(0.0, ge=0.0, description="l2net_relative: m added to each positive distance inside the "
                                   "softmax (additive margin; 0 = the paper's loss)")
    negatives: Negatives = Field(
        "random", description="triplet_random / contrastive / softmax_ce: each pair's one in-batch negative, a random "
                              "one (the papers' sampler) or the hardest (HardNet's mining; the others use every negative); "
                              "mixed (pair losses only): one of each per pair")
    hard_candidates: HardCandidates = Field(
        "random", description="softmax_ce with hardest/mixed negatives: the 16 in-batch non-matches the classifier "
                              "scores for each pair's hard one: random, or the nearest in feature space (unused with negatives: random)")
    sos_weight: float = Field(0.0, ge=0.0, description="weight of SOSNet's second-order similarity regulariser "
                                                     "(pipeline.losses.second_order_similarity; 0 = off, the paper's 1)")
    sos_knn: int = Field(8, ge=1, description="neighbours per view in the second-order term (the paper's 8)")
    compactness_weight: float = Field(0.0, ge=0.0, description="weight of L2-Net's compactness term, the mean squared "
                                      "correlation between descriptor dimensions (pipeline.losses.descriptor_correlation_penalty; "
                                      "0 = off; the paper's sums correspond to D(D-1)/B)")
    mc_mu: float = Field(0.0, ge=0.0, description="weight of the MC-Loss diversity regulariser (0 = off)")
    mc_lambda: float = Field(1.0, ge=0.0)
    mc_xi: int = Field(4, ge=1, description="MC-Loss channels per group of the last conv maps")


def _duration(value: Any) -> float | None:
    """``train.time_budget_s``: seconds or a string with units; the message says what is expected
    (the error line adds the value found)."""
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError:
        raise ValueError("a positive duration: seconds, or a string like '2h', '90m', '1h30m'") from None


class TrainConfig(_Strict):
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(128, ge=2, description="pairs per rank per step (hardest-in-batch needs >= 2)")
    batches_per_epoch: int = Field(50, ge=1, description="optimizer steps per epoch, the same on every rank (derived instead with time_budget_s)")
    lr: float = Field(0.1, gt=0.0)
    lr_reference_batch: int | None = Field(None, ge=1, description="lr is for this batch size; scaled linearly to batch_size")
    lr_schedule: Literal["linear_to_zero", "constant"] = "linear_to_zero"
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    augment: bool = Field(True, description="HardNet's joint random flip/rotate of both patches")
    augment_rotation_deg: float = Field(0.0, ge=0.0, le=45.0, description="independent small rotation of each patch")
    augment_scale: float = Field(0.0, ge=0.0, lt=0.5, description="independent zoom of each patch by up to this fraction")
    seed: int = 0
    torch_threads: int | None = Field(None, ge=1, description="intra-op threads per worker (None = CPUs per worker)")
    time_budget_s: Annotated[float | None, BeforeValidator(_duration)] = Field(
        None, description="wall-clock budget of the run (seconds, or '2h', '90m', '1h30m'): the run measures its speed "
                          "and derives batches_per_epoch so that the lr schedule ends when the budget does (pipeline.budget)")
    budget_warmup_steps: int = Field(3, ge=0, description="time_budget_s: steps before the speed is measured (start-up costs)")
    budget_probe_steps: int = Field(10, ge=1, description="time_budget_s: steps whose mean time plans the run")


class ScalingConfig(_Strict):
    num_workers: int = Field(2, ge=0, description="Ray Train workers (0 = run the loop in the driver process)")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)


class RunConfig(_Strict):
    name: str | None = Field(None, description="Ray Train run name; an existing name resumes that run")
    storage_path: str = Field("runs", description="local folder, shared mount or s3:// / gs:// URI")
    max_failures: int = Field(0, ge=-1)


class MlflowConfig(_Strict):
    tracking_uri: str | None = Field(None, description="default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db")
    experiment: str = "patchflow"
    registered_model: str = Field("patchflow-{arch}", description="registry name; {arch} is filled in")

    def model_name(self, arch: str) -> str:
        return self.registered_model.format(arch=arch)


GATE_KINDS = ("images", "phototour", "hpatches")
# The metric each benchmark gates on when none is named: matching accuracy at 3 px on image sequences
# (the number a user of a matcher compares), PhotoTour's mean FPR95 over its scenes, HPatches' matching
# mAP on split a (no task generation needed).
GATE_DEFAULT_METRICS = {"images": "mma@3px", "phototour": "fpr95", "hpatches": "matching@a"}
HPATCHES_TASKS = ("verification", "matching", "retrieval")


def _px(value: str, what: str) -> float:
    """``"3px"`` / ``"2.5px"`` -> 3.0 / 2.5 (a positive pixel threshold)."""
    try:
        px = float(value.removesuffix("px")) if value.endswith("px") else -1.0
    except ValueError:
        px = -1.0
    if not px > 0:
        raise ValueError(f"{what}: expected a positive threshold in pixels such as 3px, got {value!r}")
    return px


def gate_metric(kind: str, metric: str | None) -> tuple[str, bool]:
    """The canonical metric a benchmark gate of ``kind`` ranks by and whether lower is better;
    ValueError naming what each kind accepts. ``images``: ``mma@<t>px`` (mean matching accuracy at t px),
    ``homography@<eps>px`` (share of image pairs whose RANSAC homography is within eps px),
    ``fpr95@<construction>`` (FPR95 of that construction's pairs; ``fpr95`` = dog-oriented);
    ``phototour``: ``fpr95`` (mean over the scenes) or ``fpr95@<scene>``; ``hpatches``:
    ``<verification|matching|retrieval>[@<split>]`` (mAP, split a by default)."""
    from pipeline.data.sequences import get_construction

    if kind not in GATE_KINDS:
        raise ValueError(f"expected 'eval' or one of {', '.join(k + ':DIR' for k in GATE_KINDS)}, got kind {kind!r}")
    metric = metric or GATE_DEFAULT_METRICS[kind]
    name, _, qualifier = metric.partition("@")
    if kind == "images":
        if name in ("mma", "homography") and qualifier:
            return f"{name}@{_px(qualifier, metric):g}px", False
        if name == "fpr95":
            try:
                construction = get_construction(qualifier or "dog-oriented").name
            except ValueError as e:
                raise ValueError(f"{metric}: {e}") from None
            return f"fpr95@{construction}", True
        raise ValueError(f"images: expected a metric mma@<t>px, homography@<eps>px or fpr95[@<construction>], got {metric!r}")
    if kind == "phototour":
        if name == "fpr95":
            return metric, True
        raise ValueError(f"phototour: expected the metric fpr95 (mean over the scenes) or fpr95@<scene>, got {metric!r}")
    if name in HPATCHES_TASKS and (qualifier or "a") in HPATCHES_SPLITS:
        return f"{name}@{qualifier or 'a'}", False
    raise ValueError(f"hpatches: expected a metric <{'|'.join(HPATCHES_TASKS)}>[@<{'|'.join(HPATCHES_SPLITS)}>], "
                     f"got {metric!r}")


def parse_gate(spec: str) -> tuple[str, str | None]:
    """``--gate`` text -> (data, metric): ``eval``, or ``KIND:PATH[:METRIC]`` where a last ``:METRIC``
    is split off only when it is a metric of KIND (``images:data/oxford_graf:fpr95@harris-upright``)."""
    kind, sep, rest = spec.partition(":")
    if spec == "eval" or not sep:
        return spec, None
    head, sep, last = rest.rpartition(":")
    if sep and head:
        try:
            gate_metric(kind, last)
            return f"{kind}:{head}", last
        except ValueError:
            pass
    return spec, None


class GateConfig(_Strict):
    """What the promotion gate re-evaluates champion and challenger on. ``data: eval`` (default): the
    challenger's synthetic eval split, FPR95. ``data: images:DIR | phototour:DIR | hpatches:DIR``: that
    benchmark, ranked by ``metric`` (``gate_metric``: its default when None)."""

    data: str = Field("eval", description="eval, or images:DIR / phototour:DIR / hpatches:DIR (a real benchmark)")
    metric: str | None = Field(None, description="images: mma@3px (default), homography@3px, fpr95@<construction>; "
                                                 "phototour: fpr95[@<scene>]; hpatches: <task>[@<split>]")
    min_improvement: float = Field(0.0, ge=0.0, description="required gain in the metric's units (absolute)")
    max_keypoints: int = Field(2000, ge=1, description="images: keypoints per image (matching and pair constructions)")
    pairs: int | None = Field(None, ge=2, description="images fpr95: pairs per sequence (None = every correspondence)")
    seed: int = 0

    @model_validator(mode="after")
    def _known_data_and_metric(self) -> "GateConfig":
        if self.data == "eval":
            if self.metric not in (None, "fpr95"):
                raise ValueError(f"metric: the eval split gates on fpr95, got {self.metric!r}")
            return self
        kind, sep, path = self.data.partition(":")
        if not sep or not path:
            raise ValueError(f"data: expected 'eval' or one of {', '.join(k + ':DIR' for k in GATE_KINDS)}, got {self.data!r}")
        gate_metric(kind, self.metric)
        return self

    @property
    def kind(self) -> str:
        return self.data.partition(":")[0]

    @property
    def path(self) -> str:
        return self.data.partition(":")[2]

    @property
    def ranking(self) -> tuple[str, bool]:
        """(canonical metric, lower is better)."""
        return ("fpr95", True) if self.data == "eval" else gate_metric(self.kind, self.metric)


class RegistryConfig(_Strict):
    gate: GateConfig = GateConfig()


class SearchDomain(_Strict):
    """Exactly one of: ``grid: [..]`` (every value, Tune's grid_search), ``choice: [..]`` (sampled),
    ``uniform: [lo, hi]``, ``loguniform: [lo, hi]``."""

    grid: list[Any] | None = None
    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> "SearchDomain":
        kinds = [k for k in ("grid", "choice", "uniform", "loguniform") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(f"give exactly one of grid / choice / uniform / loguniform, got {kinds or 'none'}")
        for kind in ("grid", "choice"):
            if getattr(self, kind) == []:
                raise ValueError(f"{kind} needs at least one value")
        for kind in ("uniform", "loguniform"):
            bounds = getattr(self, kind)
            if bounds is not None and not bounds[0] < bounds[1]:
                raise ValueError(f"{kind} needs [low, high] with low < high, got {list(bounds)}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError("loguniform needs a positive lower bound")
        return self

    def candidates(self) -> list[Any]:
        """Values that must all be valid for the key: the listed values, or the two bounds."""
        for values in (self.grid, self.choice, self.uniform, self.loguniform):
            if values is not None:
                return list(values)
        return []


class ArchitectureSweep(_Strict):
    """One architecture of a multi-architecture sweep: its defaults and search space come from
    ``configs/models/<arch>.yaml``; anything here overrides them."""

    search_space: dict[str, SearchDomain] | None = Field(None, description="None = the model file's space")
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted config keys for this architecture")
    num_samples: int | None = Field(None, ge=1)
    workers_per_trial: int | None = Field(None, ge=1)

    # Keys are checked here, as --set's are; values once load_sweep has merged the architecture's model file.
    _known_keys = field_validator("search_space", "overrides")(lambda space: _known_keys(space))


def _registered_arch(name: str) -> str:
    if name not in list_models():
        raise ValueError(f"a registered model ({', '.join(list_models())})")
    return name


class SweepConfig(_Strict):
    architectures: dict[Annotated[str, AfterValidator(_registered_arch)], ArchitectureSweep] | None = Field(
        None, description="several architectures, each its own Tune run; None = just model.arch"
    )
    models_dir: str = Field("../models", description="folder of <arch>.yaml model files, relative to this config")
    num_samples: int = Field(4, ge=1, description="samples of the space; with grid keys, repeats of the whole grid")
    search_space: dict[str, SearchDomain] = Field(default_factory=dict, description="dotted config key -> domain")
    workers_per_trial: int = Field(1, ge=1)
    max_concurrent_trials: int | None = Field(None, ge=1, description="None = as many as the CPUs/GPUs fit")
    scheduler: Literal["asha", "fifo"] = Field("asha", description="asha stops lagging trials; fifo runs every trial to the end")
    search_alg: Literal["random", "optuna"] = Field("random", description="random/grid sampling, or Optuna's TPE (pip install optuna)")
    grace_period: int = Field(1, ge=1, description="ASHA: epochs before a trial can be stopped")
    reduction_factor: int = Field(2, ge=2)
    pca_dims: list[int] = Field(default_factory=list, description="PCA output dims tried on each best embedding tower, no retraining")
    scope: Literal["all", "last"] = Field(
        "all",
        description="which of a trial's epochs scores it, and whose checkpoint is registered (as Ray's "
        "ResultGrid.get_best_result(scope=)): 'all' = its best epoch by eval FPR95; 'last' = its last epoch, where "
        "its lr schedule ends, for eval splits too small to rank epochs closer than their noise",
    )

    _known_keys = field_validator("search_space")(lambda space: _known_keys(space))


class Config(_Strict):
    data: DataConfig
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    scaling: ScalingConfig = ScalingConfig()
    run: RunConfig = RunConfig()
    mlflow: MlflowConfig = MlflowConfig()
    registry: RegistryConfig = RegistryConfig()
    sweep: SweepConfig | None = None

    def with_updates(self, updates: dict[str, Any]) -> "Config":
        """A validated copy with dotted keys (``loss.margin``) replaced."""
        raw = self.model_dump()
        for key, value in updates.items():
            _set_dotted(raw, key, value)
        return Config.model_validate(raw)


def _known_keys(keyed: dict[str, Any] | None) -> dict[str, Any] | None:
    """Every key of a search space or of overrides names a leaf of Config (the same check as --set)."""
    for key in keyed or {}:
        _field_for(key)
    return keyed


def _field_for(dotted: str) -> None:
    """Raise ValueError unless ``dotted`` names a leaf of Config (search spaces, --set)."""
    model: type[BaseModel] = Config
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            where = ".".join(parts[:i]) or "the top level"
            raise ValueError(f"unknown key {dotted!r}: {where} has {', '.join(fields)}")
        annotation = _section_of(fields[part].annotation)
        if i < len(parts) - 1:
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                raise ValueError(f"unknown key {dotted!r}: {'.'.join(parts[: i + 1])} is not a section")
            model = annotation
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            raise ValueError(f"{dotted!r} is a section, not a value")


def _section_of(annotation: Any) -> Any:
    """``SweepConfig | None`` -> ``SweepConfig``: an optional section is still a section."""
    models = [a for a in get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
    return models[0] if len(models) == 1 and type(None) in get_args(annotation) else annotation


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {}) if isinstance(node, dict) else node
    node[leaf] = value


def _describe(err: dict) -> str:
    loc = ".".join(str(p) for p in err["loc"] if p != "[key]") or "(top level)"  # "[key]": a dict key's own check
    if err["type"] == "extra_forbidden":
        return f"{loc}: unknown key"
    if err["type"] == "missing":
        return f"{loc}: required key is missing"
    msg = err["msg"]
    for prefix in ("Input should be ", "Value error, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    if isinstance(err.get("input"), dict):  # a section-level check: the value is the whole section
        return f"{loc}: {msg}"
    return f"{loc}: expected {msg}, got {err.get('input')!r}"


def _format_errors(source: str, exc: ValidationError) -> str:
    lines = [_describe(e) for e in exc.errors(include_url=False)]
    return f"{source}: invalid configuration\n" + "\n".join(f"  {source}: {line}" for line in lines)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["train.epochs=3", "loss.margin=0.5"]`` -> dict, values parsed as YAML scalars."""
    updates: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE, e.g. train.epochs=3")
        try:
            _field_for(key.strip())
        except ValueError as e:
            raise ConfigError(f"--set {pair!r}: {e}") from None
        updates[key.strip()] = yaml.safe_load(value)
    return updates


def _resolve_paths(cfg: Config, base: Path) -> Config:
    """Local paths -> absolute (URIs such as s3://... are left alone)."""
    def resolve(value: str) -> str:
        return value if "://" in value else str((base / value).resolve())

    updates = {"data.shards": resolve(cfg.data.shards), "run.storage_path": resolve(cfg.run.storage_path)}
    gate = cfg.registry.gate
    if gate.data != "eval":
        updates["registry.gate.data"] = f"{gate.kind}:{resolve(gate.path)}"
    return cfg.with_updates(updates)


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _with_base(raw: dict, path: Path, source: str) -> dict:
    """``base: ../models/hardnet.yaml`` (relative to this file): that file's sections are the
    defaults; its ``search_space`` becomes ``sweep.search_space`` when the sweep gives none."""
    if "base" not in raw:
        return raw
    base_path = (path.parent / str(raw.pop("base"))).resolve()
    try:
        base = yaml.safe_load(base_path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{source}: base: file {base_path} not found") from None
    base = _with_base(base, base_path, str(base_path))
    space = base.pop("search_space", None)
    base = {k: v for k, v in base.items() if v is not None}
    merged = _deep_merge(base, raw)
    if space and isinstance(merged.get("sweep"), dict) and "search_space" not in merged["sweep"]:
        merged["sweep"]["search_space"] = space
    return merged


def load_config(
    path: str | os.PathLike,
    overrides: dict[str, Any] | None = None,
    *,
    available_cpus: int | None = None,
    available_gpus: int | None = None,
) -> Config:
    """Load and validate ``path``; ``overrides`` are dotted keys (from ``--set``).

    ``available_*`` default to this machine's counts: a local run cannot use more.
    """
    source = str(path)
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"{source}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections (data, train, ...), got {type(raw).__name__}")
    raw = _with_base(raw, Path(path), source)
    for key, value in (overrides or {}).items():
        _set_dotted(raw, key, value)
    try:
        cfg = _resolve_paths(Config.model_validate(raw), Path.cwd())
    except ValidationError as e:
        raise ConfigError(_format_errors(source, e)) from None
    problems = check_config(cfg, available_cpus, available_gpus)
    if problems:
        raise ConfigError(f"{source}: invalid configuration\n" + "\n".join(f"  {source}: {p}" for p in problems))
    return cfg


def load_sweep(path: str | os.PathLike, overrides: dict[str, Any] | None = None, **available) -> list[Config]:
    """A sweep config -> one validated Config per architecture, in file order.

    Precedence, lowest first: ``<models_dir>/<arch>.yaml`` (model, loss, train, search space) <
    this file's sections < ``sweep.architectures.<arch>.overrides`` < ``--set`` overrides.
    Without ``sweep.architectures`` it is ``[load_config(path, overrides)]``; without a ``sweep``
    section it is an error.
    """
    source = str(path)
    cfg = load_config(path, overrides, **available)
    if cfg.sweep is None:
        raise ConfigError(f"{source}: sweep: required section is missing (search_space, num_samples, ...)")
    if not cfg.sweep.architectures:
        return [cfg]
    with open(path) as f:
        raw = yaml.safe_load(f)
    raw = _with_base(raw, Path(path), source)
    models_dir = (Path(path).parent / cfg.sweep.models_dir).resolve()
    configs = []
    for arch, spec in cfg.sweep.architectures.items():
        model_file = models_dir / f"{arch}.yaml"
        if not model_file.is_file():
            raise ConfigError(f"{source}: sweep.architectures.{arch}: expected a model file {model_file}")
        base = yaml.safe_load(model_file.read_text()) or {}
        space = base.pop("search_space", None) or {}
        own = copy.deepcopy({k: v for k, v in raw.items() if k != "model"})
        merged = _deep_merge({k: v for k, v in base.items() if v is not None}, own)
        merged["model"] = _deep_merge(base.get("model") or {}, {"arch": arch})
        sweep = merged["sweep"]
        sweep.pop("architectures")
        sweep["search_space"] = spec.model_dump(mode="json")["search_space"] if spec.search_space is not None else space
        for key in ("num_samples", "workers_per_trial"):
            if getattr(spec, key) is not None:
                sweep[key] = getattr(spec, key)
        for key, value in {**spec.overrides, **(overrides or {})}.items():
            _set_dotted(merged, key, value)
        where = f"{source} (sweep.architectures.{arch} over {model_file.name})"
        try:
            arch_cfg = _resolve_paths(Config.model_validate(merged), Path.cwd())
        except ValidationError as e:
            raise ConfigError(_format_errors(where, e)) from None
        problems = check_config(arch_cfg, available.get("available_cpus"), available.get("available_gpus"))
        if problems:
            raise ConfigError(f"{where}: invalid configuration\n" + "\n".join(f"  {where}: {p}" for p in problems))
        configs.append(arch_cfg)
    return configs


def check_config(cfg: Config, available_cpus: int | None = None, available_gpus: int | None = None) -> list[str]:
    """Cross-field checks pydantic's per-field validation cannot make; returns problem lines."""
    # Joining a cluster (a Ray Job's driver, RAY_ADDRESS set): this machine's counts say nothing
    # about the cluster's; the sweep sizes itself from ray.cluster_resources() instead.
    on_cluster = bool(os.environ.get("RAY_ADDRESS"))
    cpus = available_cpus if available_cpus is not None else (10**6 if on_cluster else (os.cpu_count() or 1))
    gpus = available_gpus if available_gpus is not None else (10**6 if on_cluster else gpu_count())
    problems = []
    if not model_info(cfg.model.arch).trainable:
        problems.append(f"model.arch: {cfg.model.arch!r} is a fixed baseline, not trainable (it is evaluated in every table)")
    try:  # option values only the model's constructor checks (e.g. Siamese's input_size: 32 or 64)
        built = create_model(cfg.model.arch, **cfg.model.factory_kwargs())
    except ValueError as e:
        problems.append(f"model: {e}")
        built = None
    if cfg.sweep is not None and built is not None:  # the configured model's own size, not the default's
        too_big = [d for d in cfg.sweep.pca_dims if not 1 <= d <= built.descriptor_dim]
        if too_big:
            problems.append(f"sweep.pca_dims: expected dims in [1, {built.descriptor_dim}] ({cfg.model.arch}'s descriptor "
                            f"size with this config), got {too_big}")
    if cfg.loss.compactness_weight > 0 and model_info(cfg.model.arch).kind == "pair_classifier":
        problems.append(f"loss.compactness_weight: {cfg.model.arch!r} is a pair classifier: its features are not the "
                        "descriptor the compactness term decorrelates (expected 0)")
    if cfg.loss.sos_weight > 0:
        if model_info(cfg.model.arch).kind == "pair_classifier":
            problems.append(f"loss.sos_weight: {cfg.model.arch!r} is a pair classifier: it has no descriptor distances "
                            "for the second-order term (expected 0)")
        if cfg.train.batch_size <= cfg.loss.sos_knn:
            problems.append(f"train.batch_size: expected more than loss.sos_knn = {cfg.loss.sos_knn} pairs per rank for the "
                            f"second-order term, got {cfg.train.batch_size}")
    loss = cfg.loss.name or model_info(cfg.model.arch).default_loss
    if cfg.loss.negatives == "mixed" and loss not in PAIR_LOSSES:
        problems.append(f"loss.negatives: 'mixed' is for the pair losses ({', '.join(PAIR_LOSSES)}), not {cfg.model.arch}'s "
                        f"{loss} (expected random or hardest)")
    if cfg.loss.relative_margin > 0 and loss != "l2net_relative":
        problems.append(f"loss.relative_margin: it is the margin of L2-Net's relative-distance loss (l2net_relative), "
                        f"not {cfg.model.arch}'s {loss} (expected 0; the triplet and contrastive losses use loss.margin)")
    # (with negatives: random it has nothing to choose, as a sweep over loss.negatives may set)
    if cfg.loss.hard_candidates != "random" and loss != "softmax_ce":
        problems.append(f"loss.hard_candidates: {cfg.loss.hard_candidates!r} chooses a pair classifier's hard negatives "
                        f"(softmax_ce), not {cfg.model.arch}'s {loss} (expected random)")
    s = cfg.scaling
    if s.use_gpu and s.num_workers > gpus:
        problems.append(f"scaling.num_workers: expected at most {gpus} (GPUs available) with use_gpu, got {s.num_workers}")
    if s.num_workers * s.cpus_per_worker > cpus:
        problems.append(
            f"scaling.num_workers: expected num_workers x cpus_per_worker <= {cpus} (CPUs available), "
            f"got {s.num_workers} x {s.cpus_per_worker:g}"
        )
    if cfg.sweep is not None:
        w = cfg.sweep.workers_per_trial
        limit = gpus if s.use_gpu else int(cpus // s.cpus_per_worker)
        if w > limit:
            problems.append(f"sweep.workers_per_trial: expected at most {limit} ({'GPUs' if s.use_gpu else 'CPUs'} available), got {w}")
        for key, domain in cfg.sweep.search_space.items():
            for value in domain.candidates():
                try:
                    candidate = cfg.with_updates({key: value})
                    if key.startswith("model."):  # what only the constructor checks (HardNet8's pca_dim <= 512)
                        create_model(candidate.model.arch, **candidate.model.factory_kwargs())
                except ValidationError as e:
                    problems.append(f"sweep.search_space.{key}: value {value!r} is invalid: {_describe(e.errors()[0])}")
                except ValueError as e:
                    problems.append(f"sweep.search_space.{key}: value {value!r} is invalid: model: {e}")
    return problems
