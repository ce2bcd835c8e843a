"""What each ``patchflow`` command does, as functions that return result objects: training one
model, the multi-architecture sweep (per-architecture Tune runs, PCA search, plots, registration,
promotion, the leaderboard), evaluation on an image sequence, promotion and export.

``pipeline.cli`` parses arguments, calls these and prints what they return; tests call them
directly. Long steps report progress through a ``progress`` callable (one line per call).
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from pydantic import ValidationError

from pipeline.checkpoint import load_state, model_from_checkpoint
from pipeline.config import Config, ConfigError, GateConfig, parse_gate
from pipeline.data.shards import SourceError
from pipeline.data.stream import load_eval_pairs, load_eval_split
from pipeline.evaluate import METRIC, describe, pair_distances, pca_dimension_curve, pca_fit_pairs
from pipeline.hooks import TrainHooks
from pipeline.metrics import BOOTSTRAP_RESAMPLES, average_precision, bootstrap_interval, fpr_at_95_recall
from pipeline.models import create_model, list_models, model_info
from pipeline.models.sift import SIFT
from pipeline.pca import attach_pca, pca_head_dim
from pipeline.protocols.common import SIFT_NAME, metric_key, row_distances, text_table
from pipeline.registry import (CHALLENGER, CHAMPION, Gate, Promotion, Registration, load_descriptor, promote,
                               register_checkpoint, registered_version)
from pipeline.tracking import (RunLogger, SyncResult, TrackingError, finish_run, first_line, get_or_create_experiment,
                               guarded, pending_files, resolve_tracking_uri, sync_pending)
from pipeline.tune import (SweepResult, TrialOutcome, effect_of, find_sweep, new_sweep_id, print_progress, run_sweep,
                           start_parent_run)

Progress = Callable[[str], None]
log = logging.getLogger(__name__)
MIN_POSITIVES = 20  # below this, FPR95 (the distance at which 95% of positives match) is not a measurement


def load_model(spec: str) -> torch.nn.Module:
    """An MLflow model URI (models:/name@alias, runs:/...), a training checkpoint folder, or the
    registry name of an untrained baseline (``sift``, ``opencv_vgg``, ...: nothing to load)."""
    if Path(spec).is_dir():
        return model_from_checkpoint(spec)[0]
    if spec in list_models():
        if model_info(spec).trainable:
            raise ConfigError(f"--model {spec}: a trainable architecture needs its weights: give a checkpoint folder "
                              f"or a registered model (models:/patchflow-{spec}@champion)")
        return create_model(spec).eval()
    if ":/" not in spec:
        raise ConfigError(f"--model {spec}: expected a checkpoint folder, an MLflow model URI (models:/NAME@ALIAS, "
                          f"runs:/RUN_ID/model) or an untrained baseline ({', '.join(n for n in list_models() if not model_info(n).trainable)})")
    return load_descriptor(spec)


def _open_run(client, cfg: Config, name: str) -> str:
    """The MLflow run of Ray Train run ``name``: found by its tag (a resumed run), else created."""
    experiment_id = get_or_create_experiment(client, cfg.mlflow.experiment)
    existing = client.search_runs([experiment_id], filter_string=f"tags.`patchflow.run_name` = '{name}'", max_results=1)
    if existing:
        return existing[0].info.run_id
    run_id = client.create_run(experiment_id, run_name=name,
                               tags={"patchflow.run_name": name, "patchflow.kind": "train"}).info.run_id
    logger = RunLogger(client.tracking_uri, run_id)
    logger.params(cfg.model_dump(mode="json"))
    if logger.flush(attempts=1):
        raise TrackingError(f"run {run_id} created, its parameters not logged")
    return run_id


def sync(storage: str | Path, tracking_uri: str | None = None, progress: Progress = print_progress) -> SyncResult:
    """Send what runs under ``storage`` could not send to MLflow (their pending files); see
    ``pipeline.tracking.sync_pending``. Never raises for an unreachable server: files are kept."""
    result = sync_pending(str(storage), tracking_uri)
    if result.sent:
        progress(f"[patchflow] sent {len(result.sent)} pending MLflow file(s) from {storage}")
    if result.left:
        progress(f"[patchflow] MLflow still unreachable: {len(result.left)} pending file(s) kept in {storage}")
    return result


# ---- train ---------------------------------------------------------------------------------------


@dataclass
class TrainOutcome:
    name: str  # the Ray Train run name
    mlflow_run_id: str
    tracking_uri: str
    metrics: dict[str, Any]  # the last reported epoch's
    checkpoint_path: str | None
    pending: list[str] = field(default_factory=list)  # what MLflow could not take yet (patchflow sync sends it)


def train(cfg: Config, *, hooks: TrainHooks | None = None, verbose: bool = False, progress: Progress = print_progress) -> TrainOutcome:
    """One training run. Re-running with the same ``run.name`` resumes the Ray Train run and logs
    into the same MLflow run. MLflow must answer at the start; after that an outage costs nothing:
    what could not be sent is in ``TrainOutcome.pending`` (``sync`` sends it). ``progress`` gets one
    line per epoch; ``verbose`` shows Ray's own output too (otherwise in its log files). ``hooks``:
    see ``pipeline.hooks`` (tests inject faults)."""
    from mlflow.tracking import MlflowClient

    from pipeline.cluster import init_ray, line_relay, ray_log_dir
    from pipeline.train import build_trainer, epoch_lines, preflight

    shard_urls = preflight(cfg)
    name = cfg.run.name or f"train-{time.strftime('%Y%m%d-%H%M%S')}"
    uri = resolve_tracking_uri(cfg.mlflow.tracking_uri)
    storage = str(cfg.run.storage_path).rstrip("/")
    guarded(f"sending pending files under {storage}", lambda: sync(storage, uri))
    client = MlflowClient(uri)
    try:
        run_id = _open_run(client, cfg, name)
    except Exception as e:  # noqa: BLE001 - nothing has started yet: one line, and nothing to clean up
        raise TrackingError(f"MLflow at {uri}: cannot open the run ({first_line(e)}); start the server or set "
                            f"mlflow.tracking_uri / MLFLOW_TRACKING_URI") from e
    run_dir = f"{storage}/{name}"
    status = "FAILED"  # whatever stops the run before fit() returns, the trainer's build included
    try:
        init_ray(verbose=verbose)
        _say_where_logs_are(verbose, ray_log_dir(), progress)
        with line_relay(progress) as relay:
            trainer = build_trainer(cfg, name=name, tracking_uri=uri, mlflow_run_id=run_id, shard_urls=shard_urls,
                                    hooks=hooks, callbacks=[epoch_lines(name, relay)])
            result = trainer.fit()
        status = "FINISHED"
    finally:
        # the workers' leftovers first (the server may be back by now), then the run's status: neither is lost
        guarded("sending the run's pending files", lambda: sync_pending(run_dir, uri))
        finish_run(client, run_id, status, run_dir)
    return TrainOutcome(name, run_id, uri, dict(result.metrics), result.checkpoint.path if result.checkpoint else None,
                        pending=guarded("listing pending files", lambda: pending_files(run_dir), []))


def _say_where_logs_are(verbose: bool, log_dir: str | None, progress: Progress) -> None:
    if not verbose:
        progress(f"[patchflow] Ray's own output: {log_dir or 'the cluster nodes (ray logs)'} (--verbose shows it here)")


# ---- sweep ---------------------------------------------------------------------------------------


@dataclass
class ArchitectureReport:
    """One architecture of a sweep: its Tune run and, unless registration was skipped, the
    registered model and the promotion gate's decision."""

    arch: str
    sweep: SweepResult
    best: TrialOutcome
    pca_curve: list[tuple[int, float]] = field(default_factory=list)  # (dim, FPR95) tried on the best tower
    registration: Registration | None = None
    promotion: Promotion | None = None
    eval_ap: float | None = None

    @property
    def best_params(self) -> str:
        return ", ".join(f"{k.split('.')[-1]}={v}" for k, v in self.best.params.items()) or "defaults"

    def row(self) -> tuple[str, ...]:
        """This architecture's leaderboard row."""
        if self.registration is None:
            return (self.arch, self.best_params, f"{self.best.fpr95:.4f}", "-", self.best.mlflow_run_id or "", "-", "-")
        reg, promo = self.registration, self.promotion
        alias = CHAMPION if promo.promoted else f"{CHALLENGER} ({CHAMPION}: v{promo.current_champion})"
        return (self.arch, self.best_params, f"{reg.fpr95:.4f}", f"{self.eval_ap:.4f}", reg.run_id,
                f"{reg.model_name} v{reg.version}", alias)


@dataclass
class SweepReport:
    sweep_id: str
    parent_run_id: str
    tracking_uri: str
    architectures: list[ArchitectureReport]
    eval_pairs: int
    sift_fpr95: float
    sift_ap: float
    leaderboard: str  # the table printed and logged as the parent run's leaderboard.txt
    seconds: float
    baselines: dict[str, tuple[float, float]] = field(default_factory=dict)  # OpenCV's: name -> (FPR95, AP)


LEADERBOARD_HEADER = ("architecture", "best config", "eval FPR95", "eval AP", "MLflow run id", "model version", "alias")


def _reopen_sweep(sweep_id: str, progress: Progress) -> tuple[str, list[Config]]:
    """The parent run and configs of an interrupted sweep; runs its killed driver left RUNNING are
    marked KILLED (resumed trials reopen their own run)."""
    from mlflow.tracking import MlflowClient

    parent_id, configs = find_sweep(sweep_id)
    client = MlflowClient(resolve_tracking_uri(configs[0].mlflow.tracking_uri))
    for run in client.search_runs([client.get_run(parent_id).info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent_id}' and attributes.status = 'RUNNING'"):
        client.set_tag(run.info.run_id, "patchflow.interrupted", "driver stopped; resumed")
        client.set_terminated(run.info.run_id, "KILLED")
    client.update_run(parent_id, status="RUNNING")
    progress(f"[patchflow] resuming sweep {sweep_id} (MLflow parent run {parent_id})")
    return parent_id, configs


def _with_best_pca(cfg: Config, best: TrialOutcome, train_urls: list[str], pairs, labels, client, parent_id: str,
                   progress: Progress) -> tuple[torch.nn.Module | None, list[tuple[int, float]]]:
    """With ``sweep.pca_dims``: try a PCA head of each dimension on the best tower (fitted on its
    training descriptors, no retraining), log the curve, and return the tower with the best head
    when it beats no PCA (None keeps the checkpoint's model as it is) and the curve."""
    from pipeline.plots import pca_curve, save_figure

    model, _ = model_from_checkpoint(best.checkpoint_path)
    if not cfg.sweep.pca_dims or model.info.kind != "embedding" or pca_head_dim(model) is not None:
        return None, []  # a model with a PCA head already (its own, or fitted in training) keeps it
    curve = pca_dimension_curve(model, pca_fit_pairs(train_urls)[0], pairs, labels, cfg.sweep.pca_dims)
    arch = cfg.model.arch
    for dim, fpr, _ in curve:
        guarded(f"logging {arch}/pca_fpr95", lambda: client.log_metric(parent_id, f"{arch}/pca_fpr95", fpr, step=dim))
    with tempfile.TemporaryDirectory() as tmp:
        path = save_figure(pca_curve([d for d, _, _ in curve], [f for _, f, _ in curve], best.fpr95), Path(tmp) / f"pca_{arch}.png")
        guarded(f"logging {path.name}", lambda: client.log_artifact(parent_id, str(path), "plots"))
    dim, fpr, (components, mean) = min(curve, key=lambda c: c[1])
    progress(f"[patchflow] {arch}: PCA curve " + ", ".join(f"{d}:{f:.4f}" for d, f, _ in curve)
             + f" (no PCA: {best.fpr95:.4f})")
    return (attach_pca(model, components, mean) if fpr < best.fpr95 else None), [(d, f) for d, f, _ in curve]


def _log_plots(client, run_id: str, distances: dict[str, np.ndarray], labels: np.ndarray) -> None:
    """ROC curves of every architecture's registered model and SIFT on the same pairs, and each
    one's distance histogram, as artifacts of the sweep's parent run."""
    from pipeline.plots import distance_histogram, roc_figure, save_figure

    with tempfile.TemporaryDirectory() as tmp:
        save_figure(roc_figure({k: (d, labels) for k, d in distances.items()}), Path(tmp) / "roc.png")
        for name, d in distances.items():
            save_figure(distance_histogram(d, labels, f"{name}: pair distances"), Path(tmp) / f"distances_{name}.png")
        client.log_artifacts(run_id, tmp, "plots")


def sweep(
    configs: list[Config] | None = None,
    *,
    resume_id: str | None = None,
    register: bool = True,
    verbose: bool = False,
    progress: Progress = print_progress,
) -> SweepReport:
    """One Tune run per architecture (``configs``, from ``load_sweep``), under one MLflow parent run;
    then each architecture's best trial (with the best PCA head of ``sweep.pca_dims``) is registered
    and put through the promotion gate, SIFT is scored on the same eval pairs, and the parent run gets
    the plots and the leaderboard. ``resume_id`` continues an interrupted sweep instead (its configs
    come from its parent run; finished trials are kept). ``progress`` gets one line per trial and
    epoch; ``verbose`` adds Tune's status table and Ray's own output (otherwise in its log files)."""
    from mlflow.tracking import MlflowClient

    from pipeline.cluster import init_ray, ray_log_dir
    from pipeline.train import preflight

    t0 = time.perf_counter()
    if resume_id:
        parent_id, configs = _reopen_sweep(resume_id, progress)
        sweep_id = resume_id
    elif not configs:
        raise ConfigError("patchflow sweep: give --config FILE, or --resume SWEEP_ID")
    # every architecture's data problems surface before the first trial starts; checksums once each
    verified = [preflight(cfg) for cfg in configs]
    first = configs[0]
    uri = resolve_tracking_uri(first.mlflow.tracking_uri)
    for storage in sorted({str(c.run.storage_path).rstrip("/") for c in configs}):
        guarded(f"sending pending files under {storage}", lambda: sync(storage, uri, progress))
    if not resume_id:
        sweep_id = new_sweep_id()
        try:
            parent_id = start_parent_run(first, sweep_id, configs)
        except Exception as e:  # noqa: BLE001 - nothing has started yet
            raise TrackingError(f"MLflow at {uri}: cannot start the sweep's parent run ({first_line(e)}); start the "
                                f"server or set mlflow.tracking_uri / MLFLOW_TRACKING_URI") from e
    pairs, labels, _ = load_eval_split(first.data, verified[0]["eval"])
    client = MlflowClient(uri)
    init_ray(verbose=verbose)
    _say_where_logs_are(verbose, ray_log_dir(), progress)
    reports, curves = [], {}
    for cfg, shard_urls in zip(configs, verified):
        result = run_sweep(cfg, sweep_id=sweep_id, parent_run_id=parent_id, resume=bool(resume_id), shard_urls=shard_urls,
                           verbose=verbose, progress=progress)
        arch = cfg.model.arch
        report = ArchitectureReport(arch, result, result.best)
        progress(f"[patchflow] {arch}: best trial {report.best.trial_id} ({report.best_params}): "
                 f"eval FPR95 {report.best.fpr95:.4f} at epoch {report.best.scored_epoch}/{report.best.epochs} "
                 f"(its {'last' if cfg.sweep.scope == 'last' else 'best'})")
        if "loss.mc_mu" in cfg.sweep.search_space:
            effect = [("MC-Loss mu", "best eval FPR95", "trials")]
            effect += [(f"{mu:g}" + (" (off)" if mu == 0 else ""), f"{fpr:.4f}", str(n)) for mu, fpr, n in effect_of(result.trials, "loss.mc_mu")]
            progress(f"\n{arch}: effect of the MC-Loss diversity term\n{text_table(effect)}\n")
        if register:
            model, report.pca_curve = _with_best_pca(cfg, report.best, shard_urls["train"], pairs, labels, client, parent_id, progress)
            try:
                reg = register_checkpoint(cfg, report.best.checkpoint_path, report.best.mlflow_run_id, sweep_id=sweep_id,
                                          eval_pairs=(pairs, labels), model=model)
                gate = benchmark_gate(cfg.registry.gate)  # None: the eval pairs, where the challenger is scored already
                report.promotion = promote(reg.model_name, pairs, labels, gate=gate,
                                           min_improvement=cfg.registry.gate.min_improvement,
                                           tracking_uri=cfg.mlflow.tracking_uri, challenger_fpr95=None if gate else reg.fpr95)
                report.registration = reg
            except Exception as e:  # noqa: BLE001 - the training is done and kept: say how to finish the step later
                progress(f"[patchflow] {arch}: registration failed ({first_line(e)}); the checkpoint is kept: "
                         f"patchflow register --checkpoint {report.best.checkpoint_path}, then patchflow promote")
                report.promotion = None
            else:
                curves[arch] = reg.distances
                report.eval_ap = average_precision(reg.distances, labels)
                guarded(f"logging {arch}/eval_ap", lambda: client.log_metric(parent_id, f"{arch}/eval_ap", report.eval_ap))
        reports.append(report)
    sift_distances = pair_distances(SIFT(pairs.shape[-1]), pairs)
    sift_fpr, sift_ap = fpr_at_95_recall(sift_distances, labels), average_precision(sift_distances, labels)
    baselines = _baseline_distances(pairs)  # OpenCV's, when the [baselines] extra is installed
    scores = {name: (fpr_at_95_recall(d, labels), average_precision(d, labels)) for name, d in baselines.items()}
    rows = [LEADERBOARD_HEADER, *(r.row() for r in reports),
            (SIFT_NAME, "untrained baseline", f"{sift_fpr:.4f}", f"{sift_ap:.4f}", "-", "-", "-"),
            *((name, "untrained baseline", f"{fpr:.4f}", f"{ap:.4f}", "-", "-", "-") for name, (fpr, ap) in scores.items())]
    table = text_table(rows)
    if curves:
        guarded("logging the plots",
                lambda: _log_plots(client, parent_id, {**curves, "sift": sift_distances, **baselines}, labels))
    guarded("logging leaderboard.txt", lambda: client.log_text(parent_id, table + "\n", "leaderboard.txt"))
    guarded(f"logging sift/{METRIC}", lambda: client.log_metric(parent_id, f"sift/{METRIC}", sift_fpr))
    for name, (fpr, _) in scores.items():
        guarded(f"logging {name}/{METRIC}", lambda name=name, fpr=fpr: client.log_metric(parent_id, f"{name}/{METRIC}", fpr))
    finish_run(client, parent_id, "FINISHED", str(first.run.storage_path).rstrip("/"))
    return SweepReport(sweep_id, parent_id, uri, reports, len(labels), sift_fpr, sift_ap, table, time.perf_counter() - t0,
                       scores)


def _baseline_distances(pairs: np.ndarray) -> dict[str, np.ndarray]:
    """Pair distances of each OpenCV baseline (none without the [baselines] extra)."""
    from pipeline.models.opencv import OPENCV_MODELS, opencv_available

    return {name: pair_distances(create_model(name), pairs) for name in OPENCV_MODELS} if opencv_available() else {}


# ---- evaluate ------------------------------------------------------------------------------------

PROTOCOLS = ("images", "phototour", "hpatches")
EVAL_TAG = "eval"  # registered versions get eval/<protocol>/<metric> tags from each evaluation of them


@dataclass
class EvaluatedModel:
    """One row of the evaluation tables."""

    name: str  # as printed
    key: str  # its prefix in the MLflow run's metrics: "sift", "opencv_vgg", "model1", ...
    module: torch.nn.Module
    spec: str | None = None  # as given (--model); None for the baselines
    version: tuple[str, str] | None = None  # (registered model, version) of a models:/ URI


def _registered_version(spec: str) -> tuple[str, str] | None:
    """``models:/name@alias`` or ``models:/name/N`` -> (name, version) in the tracking store, else None."""
    from mlflow.tracking import MlflowClient

    if not spec.startswith("models:/"):
        return None
    ref = spec[len("models:/"):]
    client = MlflowClient(resolve_tracking_uri(None))
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return name, str(client.get_model_version_by_alias(name, alias).version)
    name, _, version = ref.rpartition("/")
    return (name, version) if name and version.isdigit() else None


def evaluation_models(specs: Sequence[str] = (), *, baselines: bool | None = None) -> tuple[list[EvaluatedModel], list[str]]:
    """kornia's SIFT, then OpenCV's baselines (``baselines``: None = when the [baselines] extra is
    importable, True = required, False = none), then each ``--model`` spec (``load_model``); a spec
    naming a row already there is not added twice. A ``models:/`` URI is resolved to its version
    once and that version is loaded (an alias moved meanwhile does not mix two versions). Returns the
    rows and notes for the report."""
    from pipeline.models.opencv import EXTRA, OPENCV_MODELS, opencv_available

    rows = [EvaluatedModel(SIFT_NAME, "sift", SIFT(32))]
    notes = []
    if baselines is None:
        baselines = opencv_available()
        if not baselines:
            notes.append(f"OpenCV baselines ({', '.join(OPENCV_MODELS)}) left out: {EXTRA}")
    elif baselines and not opencv_available():
        raise ConfigError(f"--baselines: OpenCV's baselines need the [baselines] extra: {EXTRA}")
    if baselines:
        rows += [EvaluatedModel(name, name, create_model(name).eval()) for name in OPENCV_MODELS]
    for i, spec in enumerate(specs, start=1):
        if spec in ("sift", *(r.name for r in rows)):
            notes.append(f"--model {spec}: already a row ({SIFT_NAME if spec == 'sift' else spec})")
            continue
        version = _registered_version(spec)
        module = load_model(f"models:/{version[0]}/{version[1]}" if version else spec)
        name = f"{spec} (v{version[1]})" if version and "@" in spec else spec
        rows.append(EvaluatedModel(name, f"model{i}", module, spec, version))
    return rows, notes


def _data_fingerprint(paths: Sequence[str | Path]) -> tuple[str, int, int]:
    """(sha256, files, bytes) over every file under ``paths`` (names relative to each path, then
    contents, in sorted order): the version of the benchmark data an evaluation read."""
    import hashlib

    digest, files, size = hashlib.sha256(), 0, 0
    for root in map(Path, paths):
        found = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in found:
            digest.update(str(path.relative_to(root) if path != root else path.name).encode() + b"\0")
            with path.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
                    size += len(chunk)
            files += 1
    return digest.hexdigest(), files, size


@dataclass
class ModelScore:
    name: str
    fpr95: float
    fpr95_low: float  # 95% bootstrap interval
    fpr95_high: float
    ap: float


@dataclass
class PairSetScores:
    """FPR95 (with 95 % bootstrap intervals) and AP of every descriptor on each set of labelled
    pairs (a pair construction, the synthetic eval split): rows descriptors, columns pair sets."""

    columns: dict[str, tuple[int, int]]  # column -> (pairs, positives)
    scores: dict[str, dict[str, ModelScore]]  # row -> column -> score
    bootstrap: int = BOOTSTRAP_RESAMPLES
    title: str = "FPR95"

    def best(self, column: str) -> str:
        return min(self.scores, key=lambda name: self.scores[name][column].fpr95)

    def mark(self, name: str, column: str) -> str:
        """``*`` the column's lowest FPR95; ``~`` an interval overlapping the best's: the difference
        between the two is inside the intervals."""
        best = self.scores[self.best(column)][column]
        s = self.scores[name][column]
        return "*" if s is best else ("~" if s.fpr95_low <= best.fpr95_high else "")

    def table(self) -> str:
        rows = [["descriptor", *self.columns]]
        for name, per in self.scores.items():
            rows.append([name, *(f"{s.fpr95:.3f} [{s.fpr95_low:.3f}, {s.fpr95_high:.3f}]{self.mark(name, c)}"
                                 for c, s in per.items())])
        pairs = ", ".join(f"{c}: {n} ({p} positive)" for c, (n, p) in self.columns.items())
        head = (f"{self.title}: FPR at 95 % recall (lower is better), 95 % bootstrap interval ({self.bootstrap} "
                f"resamples of the pairs) in brackets; * = lowest of the column, ~ = interval overlaps the lowest's "
                f"(the difference is inside the intervals). Pairs: {pairs}")
        return text_table(rows, head)

    def metrics(self) -> dict[str, float]:
        """Flat, MLflow-safe: ``<row>/<column>/fpr95`` (+ ``_low`` / ``_high``) and ``<row>/<column>/ap``."""
        out = {}
        for name, per in self.scores.items():
            for column, s in per.items():
                values = {"fpr95": s.fpr95, "fpr95_low": s.fpr95_low, "fpr95_high": s.fpr95_high, "ap": s.ap}
                out |= {metric_key(name, column, k): v for k, v in values.items()}
        return out

    def to_dict(self) -> dict:
        return {"protocol": "pairs", "columns": {c: {"pairs": n, "positives": p} for c, (n, p) in self.columns.items()},
                "bootstrap": self.bootstrap,
                "models": {n: {c: vars(s) for c, s in per.items()} for n, per in self.scores.items()}}


def score_pair_sets(models: dict[str, torch.nn.Module], pair_sets: dict[str, tuple[np.ndarray, np.ndarray]],
                    *, seed: int = 0, bootstrap: int = BOOTSTRAP_RESAMPLES, title: str = "FPR95") -> PairSetScores:
    """Every model on every set of labelled pairs (uint8 (N, 2, P, P), labels (N,)). A set's distinct
    patches are described once per model (a point's image-1 patch recurs in its positive and its
    negative pairs)."""
    columns = {c: (len(labels), int(labels.sum())) for c, (_, labels) in pair_sets.items()}
    result = PairSetScores(columns, {name: {} for name in models}, bootstrap, title)
    for column, (pairs, labels) in pair_sets.items():
        flat = pairs.reshape(2 * len(pairs), -1)
        unique, where = np.unique(flat, axis=0, return_inverse=True)
        where = where.reshape(-1)  # numpy 2 keeps the input's shape for axis=0
        patches = unique.reshape(-1, *pairs.shape[2:])
        first, second = where[0::2], where[1::2]
        for name, model in models.items():
            desc = describe(model, patches)
            d = row_distances(model, desc[first], desc[second])
            lo, hi = bootstrap_interval(d, labels, fpr_at_95_recall, n=bootstrap, seed=seed)
            result.scores[name][column] = ModelScore(name, fpr_at_95_recall(d, labels), lo, hi,
                                                     average_precision(d, labels))
    return result


@dataclass
class Evaluation:
    """One ``patchflow evaluate``: the protocol's result objects (each with ``table()``,
    ``metrics()``, ``to_dict()``), the rows' models, and the MLflow run it was logged as."""

    protocol: str  # "images", "phototour" or "hpatches"
    data: str  # resolved path
    data_sha256: str
    split: str  # the constructions, scenes or HPatches split evaluated
    models: list[EvaluatedModel]
    results: dict[str, Any]  # "fpr95" and "matching" (images), "phototour", "hpatches"
    params: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    mlflow_run_id: str | None = None
    tracking_uri: str | None = None
    seconds: float = 0.0

    def table(self) -> str:
        """What the command prints: every result's table, then the notes."""
        return "\n\n".join([r.table() for r in self.results.values()] + (["\n".join(self.notes)] if self.notes else []))

    def metrics(self) -> dict[str, float]:
        """Every result's metrics with each row's name replaced by its key (``sift/...``,
        ``model1/...``): the MLflow run's metrics."""
        prefixes = sorted(((metric_key(m.name) + "/", m.key + "/") for m in self.models), key=lambda p: -len(p[0]))
        out = {}
        for result in self.results.values():
            for k, v in result.metrics().items():
                prefix, key = next((p, key) for p, key in prefixes if k.startswith(p))
                out[key + k[len(prefix):]] = float(v)
        return out

    def model_metrics(self, model: EvaluatedModel) -> dict[str, float]:
        """``model``'s metrics without its key and without interval bounds: its version's tags."""
        prefix = model.key + "/"
        return {k[len(prefix):]: v for k, v in self.metrics().items()
                if k.startswith(prefix) and not k.endswith(("_low", "_high"))}


def evaluate_on_images(
    images: str | Path,
    models: Sequence[str] = (),
    *,
    constructions: Sequence[str] | None = None,
    baselines: bool | None = None,
    n_pairs: int | None = None,
    seed: int = 0,
    redetect: bool = False,
    max_keypoints: int = 2000,
    matching: bool = True,
    experiment: str | None = "patchflow-evaluation",
    progress: Progress = print_progress,
) -> Evaluation:
    """Each model (MLflow URI, checkpoint folder or baseline name), kornia's SIFT and OpenCV's
    baselines on real pairs of an image sequence (or a folder of them) cut by every construction of
    ``CONSTRUCTIONS`` (or those named): FPR95 with bootstrap intervals, one column per construction;
    then image matching (mutual-NN MMA at 1..10 px, matches, homography accuracy), unless
    ``matching=False``. Logged as one MLflow run in ``experiment`` (None: not logged)."""
    from pipeline.data.sequences import CONSTRUCTIONS, get_construction, sequence_pairs
    from pipeline.protocols import evaluate_image_matching

    t0 = time.perf_counter()
    if n_pairs is not None and n_pairs < 2 * MIN_POSITIVES:
        raise ConfigError(f"--pairs {n_pairs}: expected at least {2 * MIN_POSITIVES} pairs per sequence (half of them "
                          f"positive; FPR95 needs {MIN_POSITIVES} positives)")
    names = list(constructions) if constructions else list(CONSTRUCTIONS)
    for name in names:
        try:
            get_construction(name)
        except ValueError as e:
            raise ConfigError(f"--construction: {e}") from None
    rows, notes = evaluation_models(models, baselines=baselines)
    named = {m.name: m.module for m in rows}
    sizes = _image_size_mismatches(images)
    if sizes:
        log.warning("%s: images differ in size from image 1 (%s): check that each homography file belongs to its "
                    "images", images, sizes)
    pair_sets = {}
    for name in names:
        progress(f"[patchflow] {Path(images).name}: cutting {name} pairs")
        try:
            pairs, labels, _ = sequence_pairs(images, n_pairs=n_pairs, seed=seed, redetect=redetect,
                                              max_keypoints=max_keypoints, construction=name, progress=True)
        except SourceError as e:
            raise SourceError(f"{e} (image sizes differ: {sizes})" if sizes else str(e)) from None
        if int(labels.sum()) < MIN_POSITIVES:
            raise SourceError(f"{images}: only {int(labels.sum())} positive {name} pairs ({len(labels)} pairs) survived "
                              f"the homography checks; FPR95 needs at least {MIN_POSITIVES}"
                              + (f" (image sizes: {sizes})" if sizes else ""))
        pair_sets[name] = (pairs, labels)
    results: dict[str, Any] = {"fpr95": score_pair_sets(named, pair_sets, seed=seed,
                                                        title=f"FPR95 on {Path(images).name}, by pair construction")}
    if matching:
        progress(f"[patchflow] {Path(images).name}: image matching")
        results["matching"] = evaluate_image_matching(images, named, sift=False, max_keypoints=max_keypoints, seed=seed,
                                                      progress=True)
    params = {"pairs_per_sequence": n_pairs or "all", "seed": seed, "redetect": redetect, "max_keypoints": max_keypoints,
              "constructions": ",".join(names), "matching": matching}
    return _finish(Evaluation("images", str(Path(images).resolve()), "", ",".join(names), rows, results, params, notes),
                   [images], experiment, t0)


def _phototour_scenes(root: Path, splits: Sequence[str] | None) -> dict[str, Path]:
    """Scene name -> folder or .pt: ``root`` itself when it is a scene, else its scene folders / .pt
    caches (those named by ``splits``, default all)."""
    from pipeline.data.shards import SourceError
    from pipeline.protocols import phototour_match_files

    def is_scene(p: Path) -> bool:
        try:
            phototour_match_files(p)
            return True
        except SourceError:
            return False

    if not root.exists():
        raise SourceError(f"{root}: not found (expected a UBC PhotoTour scene folder or a folder of scenes)")
    if root.suffix == ".pt" or is_scene(root):
        scenes = {root.stem if root.suffix == ".pt" else root.name: root}
    else:
        scenes = {p.stem if p.suffix == ".pt" else p.name: p for p in sorted(root.iterdir())
                  if (p.is_dir() or p.suffix == ".pt") and is_scene(p)}
    if not scenes:
        raise SourceError(f"{root}: no PhotoTour scene (a folder with m50_*.txt pair files, or torchvision's <name>.pt)")
    if splits:
        missing = [s for s in splits if s not in scenes]
        if missing:
            raise SourceError(f"{root / missing[0]}: PhotoTour scene not found (scenes here: {', '.join(scenes)})")
        scenes = {s: scenes[s] for s in splits}
    return scenes


def evaluate_on_phototour(root: str | Path, models: Sequence[str] = (), *, splits: Sequence[str] | None = None,
                          baselines: bool | None = None, seed: int = 0,
                          experiment: str | None = "patchflow-evaluation") -> Evaluation:
    """The HardNet paper's table: FPR95 on each scene's m50 pairs (``splits``: scene names under
    ``root``, default every scene found; ``root`` may be one scene), every model, SIFT and the
    baselines, with bootstrap intervals; logged as one MLflow run."""
    from pipeline import protocols

    t0 = time.perf_counter()
    scenes = _phototour_scenes(Path(root), splits)
    rows, notes = evaluation_models(models, baselines=baselines)
    result = protocols.evaluate_phototour(scenes, {m.name: m.module for m in rows}, sift=False, seed=seed, progress=True)
    return _finish(Evaluation("phototour", str(Path(root).resolve()), "", ",".join(scenes), rows,
                              {"phototour": result}, {"seed": seed}, notes), list(scenes.values()), experiment, t0)


def evaluate_on_hpatches(root: str | Path, models: Sequence[str] = (), *, split: str = "a",
                         baselines: bool | None = None, tasks: Sequence[str] | None = None,
                         experiment: str | None = "patchflow-evaluation", **generate) -> Evaluation:
    """hpatches-benchmark's verification, matching and retrieval mAP on ``split``'s test sequences
    (its task files where ``root`` has them, else generated as the benchmark does; ``generate``:
    ``hpatches_tasks``' sizes), every model, SIFT and the baselines; logged as one MLflow run with the
    per-task detail as an artifact."""
    from pipeline import protocols
    from pipeline.data.hpatches import release_dir
    from pipeline.protocols.hpatches import TASKS

    t0 = time.perf_counter()
    rows, notes = evaluation_models(models, baselines=baselines)
    result = protocols.evaluate_hpatches(root, {m.name: m.module for m in rows}, sift=False, split=split,
                                         tasks=tasks or TASKS, progress=True, **generate)
    rel = release_dir(root)
    read = [rel / s for s in result.sequences] + [Path(v) for v in result.sources.values() if Path(v).is_dir()]
    return _finish(Evaluation("hpatches", str(Path(root).resolve()), "", split, rows, {"hpatches": result},
                              {"tasks": ",".join(tasks or TASKS), **{f"task_source.{k}": v for k, v in result.sources.items()},
                               **generate}, notes), read, experiment, t0)


def _finish(report: Evaluation, read: Sequence[str | Path], experiment: str | None, t0: float) -> Evaluation:
    """Fingerprint the data that was read, log the run, time it."""
    report.data_sha256, files, size = _data_fingerprint(read)
    report.params |= {"data_files": files, "data_bytes": size}
    if experiment is not None:  # an MLflow failure is a warning: the figures are returned all the same
        report.tracking_uri, report.mlflow_run_id = guarded(
            "logging the evaluation", lambda: _log_evaluation(report, experiment), (None, None))
    report.seconds = time.perf_counter() - t0
    return report


def _image_size_mismatches(images: str | Path) -> str:
    """"name: WxH vs WxH, ..." for each image whose size differs from its sequence's image 1 ("" if none)."""
    from PIL import Image

    from pipeline.data.sequences import find_sequences, open_sequence

    out = []
    for seq_dir in find_sequences(images):
        seq = open_sequence(seq_dir)
        sizes = {k: Image.open(p).size for k, p in sorted(seq.images.items())}  # header only
        w1, h1 = sizes[1]
        out += [f"{seq.images[k].name} {w}x{h} vs {seq.images[1].name} {w1}x{h1}" for k, (w, h) in sizes.items() if (w, h) != (w1, h1)]
    return ", ".join(out)



def _evaluation_plots(report: Evaluation, folder: Path) -> None:
    """MMA against the threshold; FPR95 by construction / scene with intervals; one bar chart per
    HPatches task (by difficulty)."""
    from pipeline.plots import grouped_bars, mma_curve, save_figure

    res = report.results
    if "matching" in res and res["matching"].pairs:
        m = res["matching"]
        save_figure(mma_curve(m.thresholds, {n: m.mma(n) for n in m.pairs}), folder / "mma.png")
    if "fpr95" in res:
        s = res["fpr95"]
        save_figure(grouped_bars({n: {c: v.fpr95 for c, v in per.items()} for n, per in s.scores.items()},
                                 s.title, "FPR95 (lower is better)",
                                 {n: {c: (v.fpr95_low, v.fpr95_high) for c, v in per.items()} for n, per in s.scores.items()}),
                    folder / "fpr95_constructions.png")
    if "phototour" in res:
        p = res["phototour"]
        labels = [c.label for c in p.columns]
        save_figure(grouped_bars({n: dict(zip(labels, v)) for n, v in p.fpr95.items()}, "PhotoTour m50 pairs",
                                 "FPR95 (lower is better)", {n: dict(zip(labels, v)) for n, v in p.intervals.items()}),
                    folder / "phototour_fpr95.png")
    if "hpatches" in res:
        from pipeline.protocols.hpatches import DIFFICULTIES, NEGATIVES

        h = res["hpatches"]
        per_task = {
            "verification": {n: {DIFFICULTIES[t]: float(np.mean([v[t][g]["ap"] for g in NEGATIVES])) for t in DIFFICULTIES}
                             for n, v in h.verification.items()},
            "matching": {n: {DIFFICULTIES[t]: v for t, v in h.matching_by_difficulty(n).items()} for n in h.matching},
            "retrieval": {n: {DIFFICULTIES[t]: float(np.mean(list(r[t].values()))) for t in DIFFICULTIES}
                          for n, r in h.retrieval.items()},
        }
        for task, values in per_task.items():
            if values:
                save_figure(grouped_bars(values, f"HPatches {task}, split {h.split}", "mAP (higher is better)"),
                            folder / f"hpatches_{task}.png")


def _log_evaluation(report: Evaluation, experiment: str) -> tuple[str, str]:
    """One MLflow run: protocol, data (path, sha256), split and models as params; the metrics; the
    tables, each result's JSON and the plots as artifacts. Each evaluated registered version gets
    ``eval/<protocol>/<metric>`` tags (and where they came from)."""
    import json

    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(None)
    client = MlflowClient(uri)
    run = client.create_run(get_or_create_experiment(client, experiment),
                            run_name=f"evaluate-{report.protocol}-{Path(report.data).name}",
                            tags={"patchflow.kind": "evaluation", "patchflow.protocol": report.protocol})
    run_id = run.info.run_id
    logger = RunLogger(uri, run_id)
    logger.params({"protocol": report.protocol, "data": report.data, "data_sha256": report.data_sha256,
                   "split": report.split, "models": ",".join(m.name for m in report.models), **report.params})
    logger.tags({f"{m.key}.name": m.name for m in report.models}
                | {f"{m.key}.uri": m.spec for m in report.models if m.spec}
                | {f"{m.key}.version": f"{m.version[0]} v{m.version[1]}" for m in report.models if m.version})
    metrics = report.metrics()
    logger.metrics(metrics, step=0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "tables.txt").write_text(report.table() + "\n")
        for name, result in report.results.items():
            (folder / f"{name}.json").write_text(json.dumps(result.to_dict(), indent=1, default=float))
        if "hpatches" in report.results:
            (folder / "hpatches_detail.txt").write_text(report.results["hpatches"].detail_table() + "\n")
        client.log_artifacts(run_id, tmp)
    with tempfile.TemporaryDirectory() as tmp:
        _evaluation_plots(report, Path(tmp))
        client.log_artifacts(run_id, tmp, "plots")
    for m in report.models:
        if m.version is None:
            continue
        tags = {f"{EVAL_TAG}/{report.protocol}/{k}": f"{v:.6g}" for k, v in report.model_metrics(m).items()}
        tags |= {f"{EVAL_TAG}/{report.protocol}/data": f"{report.data} (sha256 {report.data_sha256})",
                 f"{EVAL_TAG}/{report.protocol}/run_id": run_id}
        for key, value in tags.items():
            client.set_model_version_tag(m.version[0], m.version[1], key, value)
    client.set_terminated(run_id, "FINISHED")
    return uri, run_id


# ---- promotion gate on a benchmark ---------------------------------------------------------------


def benchmark_gate(gate: GateConfig) -> Gate | None:
    """The promotion gate ``gate`` names: None for the eval split (the caller's pairs), else a Gate
    that scores models on the benchmark with its metric (``GateConfig.ranking``)."""
    from pipeline import protocols

    if gate.data == "eval":
        return None
    metric, lower = gate.ranking
    name, _, qualifier = metric.partition("@")
    path = Path(gate.path)
    if not path.exists():
        raise ConfigError(f"gate {gate.data}: {path} not found (a metric goes last: {gate.kind}:DIR:METRIC)")
    if gate.kind == "images":
        if name == "fpr95":
            from pipeline.data.sequences import sequence_pairs

            def score(models):
                pairs, labels, _ = sequence_pairs(path, n_pairs=gate.pairs, seed=gate.seed, max_keypoints=gate.max_keypoints,
                                                  construction=qualifier)
                s = score_pair_sets(models, {qualifier: (pairs, labels)}, seed=gate.seed)
                return {a: s.scores[a][qualifier].fpr95 for a in models}
        else:
            px = float(qualifier.removesuffix("px"))

            def score(models):
                r = protocols.evaluate_image_matching(path, models, sift=False, max_keypoints=gate.max_keypoints,
                                                      seed=gate.seed, thresholds=[px], homography_thresholds=[px])
                return {a: float(r.mma(a)[0]) if name == "mma" else r.homography_accuracy(a)[px] for a in models}
        read = [path]
    elif gate.kind == "phototour":
        scenes = _phototour_scenes(path, [qualifier] if qualifier else None)

        def score(models):
            r = protocols.evaluate_phototour(scenes, models, sift=False, seed=gate.seed)
            return {a: r.mean(a) for a in models}
        read = list(scenes.values())
    else:
        def score(models):
            r = protocols.evaluate_hpatches(path, models, sift=False, split=qualifier, tasks=[name])
            return {a: r.summary(a)[name] / 100 for a in models}  # mAP in [0, 1], like the other metrics
        read = [path]
    return Gate(f"{gate.kind}:{path.resolve()}", metric, lower, score, _data_fingerprint(read)[0])


# ---- promote / export ----------------------------------------------------------------------------


def register(checkpoint: str | Path, *, shards: str | None = None, model_name: str | None = None) -> Registration:
    """Register a training checkpoint's model as the ``challenger`` of its registered model (tensors and a
    model card; scored on the eval split of ``shards``, by default the checkpoint's own data.shards).
    The way to re-register a version an older patchflow logged as a pickle. Logged into the checkpoint's
    MLflow run when this server has it, else into a new run of the checkpoint config's experiment."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    _, cfg = model_from_checkpoint(checkpoint)  # refuses anything but tensors and plain values
    uri = resolve_tracking_uri(None)
    updates: dict[str, Any] = {"mlflow.tracking_uri": uri}
    if shards:
        updates["data.shards"] = shards if "://" in shards else str(Path(shards).resolve())
    if model_name:
        updates["mlflow.registered_model"] = model_name
    cfg = cfg.with_updates(updates)
    client = MlflowClient(uri)
    run_id = load_state(checkpoint).get("mlflow_run_id")
    try:
        client.get_run(run_id) if run_id else None
    except MlflowException:
        run_id = None  # trained against another server
    if not run_id:
        run_id = client.create_run(get_or_create_experiment(client, cfg.mlflow.experiment),
                                   run_name=f"register-{Path(checkpoint).name}",
                                   tags={"patchflow.kind": "registration", "patchflow.checkpoint": str(checkpoint)}).info.run_id
        client.set_terminated(run_id, "FINISHED")
    return register_checkpoint(cfg, str(Path(checkpoint).resolve()), run_id)


def promote_registered(model_name: str, *, shards: str | None = None, eval_pairs: int | None = None,
                       min_improvement: float = 0.0, dry_run: bool = False,
                       gate: GateConfig | str | None = None) -> Promotion:
    """The promotion gate: on the eval split of ``shards``, by default the shards the challenger was
    registered against (its ``data_shards`` tag); or on the benchmark ``gate`` names (a GateConfig,
    or ``--gate`` text: ``images:DIR[:METRIC]``, ``phototour:DIR[:METRIC]``, ``hpatches:DIR[:METRIC]``)."""
    from mlflow.tracking import MlflowClient

    if isinstance(gate, str):
        data, metric = parse_gate(gate)
        try:
            gate = GateConfig(data=data, metric=metric, min_improvement=min_improvement,
                              **({"pairs": eval_pairs} if eval_pairs else {}))
        except ValidationError as e:
            raise ConfigError(f"--gate {gate}: {e.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    bench = benchmark_gate(gate) if gate is not None else None
    if bench is not None:
        return promote(model_name, gate=bench, min_improvement=min_improvement, dry_run=dry_run)
    if shards is None:
        version = registered_version(MlflowClient(resolve_tracking_uri(None)), model_name, CHALLENGER)
        shards = version.tags.get("data_shards")
        if not shards:
            raise ConfigError(f"{model_name} v{version.version} has no data_shards tag; pass --shards DIR")
    pairs, labels, _ = load_eval_pairs(shards, eval_pairs)  # checksums verified, a short set refused
    return promote(model_name, pairs, labels, min_improvement=min_improvement, dry_run=dry_run)


@dataclass
class ExportOutcome:
    path: Path
    format: str
    max_abs_error: float  # |exported - module| on a check batch


def export_model(spec: str, fmt: str, out: str | Path) -> ExportOutcome:
    """Export a model (MLflow URI or checkpoint folder) and check that the file reproduces it."""
    from pipeline.export import export_descriptor, load_exported

    model = load_model(spec)
    path = export_descriptor(model, fmt, out)
    x = np.random.default_rng(0).random((3, 1, model.input_size, model.input_size), dtype=np.float32)
    with torch.no_grad():
        expected = model.eval()(torch.from_numpy(x)).numpy()
    return ExportOutcome(path, fmt, float(np.abs(load_exported(path)(x) - expected).max()))


__all__ = ["ArchitectureReport", "EvaluatedModel", "Evaluation", "ExportOutcome", "ModelScore", "PairSetScores",
           "SweepReport", "TrainOutcome", "benchmark_gate", "evaluate_on_hpatches", "evaluate_on_images",
           "evaluate_on_phototour", "evaluation_models", "export_model", "load_model", "promote_registered", "register",
           "score_pair_sets", "sweep", "sync", "train"]
