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

from pipeline.checkpoint import load_state, model_from_checkpoint
from pipeline.config import Config, ConfigError
from pipeline.data.shards import SourceError
from pipeline.data.stream import load_eval_pairs, load_eval_split
from pipeline.evaluate import METRIC, pair_distances, pca_dimension_curve, pca_fit_patches
from pipeline.hooks import TrainHooks
from pipeline.metrics import average_precision, bootstrap_interval, fpr_at_95_recall
from pipeline.models import create_model, list_models, model_info
from pipeline.models.sift import SIFT
from pipeline.pca import attach_pca, pca_head_dim
from pipeline.protocols.common import SIFT_NAME, text_table
from pipeline.registry import (CHALLENGER, CHAMPION, Promotion, Registration, load_descriptor, promote, register_checkpoint,
                               registered_version)
from pipeline.tracking import (RunLogger, SyncResult, TrackingError, finish_run, first_line, get_or_create_experiment,
                               guarded, pending_files, resolve_tracking_uri, sync_pending)
from pipeline.tune import SweepResult, TrialOutcome, effect_of, find_sweep, new_sweep_id, run_sweep, start_parent_run

Progress = Callable[[str], None]
log = logging.getLogger(__name__)
MIN_POSITIVES = 20  # below this, FPR95 (the distance at which 95% of positives match) is not a measurement


def _say(line: str) -> None:
    print(line, flush=True)


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


def sync(storage: str | Path, tracking_uri: str | None = None, progress: Progress = _say) -> SyncResult:
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


def train(cfg: Config, *, hooks: TrainHooks | None = None) -> TrainOutcome:
    """One training run. Re-running with the same ``run.name`` resumes the Ray Train run and logs
    into the same MLflow run. MLflow must answer at the start; after that an outage costs nothing:
    what could not be sent is in ``TrainOutcome.pending`` (``sync`` sends it). ``hooks``: see
    ``pipeline.hooks`` (tests inject faults)."""
    from mlflow.tracking import MlflowClient

    from pipeline.cluster import init_ray
    from pipeline.train import build_trainer, preflight

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
        init_ray()
        trainer = build_trainer(cfg, name=name, tracking_uri=uri, mlflow_run_id=run_id, shard_urls=shard_urls, hooks=hooks)
        result = trainer.fit()
        status = "FINISHED"
    finally:
        # the workers' leftovers first (the server may be back by now), then the run's status: neither is lost
        guarded("sending the run's pending files", lambda: sync_pending(run_dir, uri))
        finish_run(client, run_id, status, run_dir)
    return TrainOutcome(name, run_id, uri, dict(result.metrics), result.checkpoint.path if result.checkpoint else None,
                        pending=guarded("listing pending files", lambda: pending_files(run_dir), []))


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
            return (self.arch, self.best_params, f"{self.best.best_fpr95:.4f}", "-", self.best.mlflow_run_id or "", "-", "-")
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
    curve = pca_dimension_curve(model, pca_fit_patches(train_urls), pairs, labels, cfg.sweep.pca_dims)
    arch = cfg.model.arch
    for dim, fpr, _ in curve:
        guarded(f"logging {arch}/pca_fpr95", lambda: client.log_metric(parent_id, f"{arch}/pca_fpr95", fpr, step=dim))
    with tempfile.TemporaryDirectory() as tmp:
        path = save_figure(pca_curve([d for d, _, _ in curve], [f for _, f, _ in curve], best.best_fpr95), Path(tmp) / f"pca_{arch}.png")
        guarded(f"logging {path.name}", lambda: client.log_artifact(parent_id, str(path), "plots"))
    dim, fpr, (components, mean) = min(curve, key=lambda c: c[1])
    progress(f"[patchflow] {arch}: PCA curve " + ", ".join(f"{d}:{f:.4f}" for d, f, _ in curve)
             + f" (no PCA: {best.best_fpr95:.4f})")
    return (attach_pca(model, components, mean) if fpr < best.best_fpr95 else None), [(d, f) for d, f, _ in curve]


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
    progress: Progress = _say,
) -> SweepReport:
    """One Tune run per architecture (``configs``, from ``load_sweep``), under one MLflow parent run;
    then each architecture's best trial (with the best PCA head of ``sweep.pca_dims``) is registered
    and put through the promotion gate, SIFT is scored on the same eval pairs, and the parent run gets
    the plots and the leaderboard. ``resume_id`` continues an interrupted sweep instead (its configs
    come from its parent run; finished trials are kept)."""
    from mlflow.tracking import MlflowClient

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
    reports, curves = [], {}
    for cfg, shard_urls in zip(configs, verified):
        result = run_sweep(cfg, sweep_id=sweep_id, parent_run_id=parent_id, resume=bool(resume_id), shard_urls=shard_urls)
        arch = cfg.model.arch
        report = ArchitectureReport(arch, result, result.best)
        progress(f"[patchflow] {arch}: best trial {report.best.trial_id} ({report.best_params}): "
                 f"eval FPR95 {report.best.best_fpr95:.4f}")
        if "loss.mc_mu" in cfg.sweep.search_space:
            effect = [("MC-Loss mu", "best eval FPR95", "trials")]
            effect += [(f"{mu:g}" + (" (off)" if mu == 0 else ""), f"{fpr:.4f}", str(n)) for mu, fpr, n in effect_of(result.trials, "loss.mc_mu")]
            progress(f"\n{arch}: effect of the MC-Loss diversity term\n{text_table(effect)}\n")
        if register:
            model, report.pca_curve = _with_best_pca(cfg, report.best, shard_urls["train"], pairs, labels, client, parent_id, progress)
            try:
                reg = register_checkpoint(cfg, report.best.checkpoint_path, report.best.mlflow_run_id, sweep_id=sweep_id,
                                          eval_pairs=(pairs, labels), model=model)
                report.promotion = promote(reg.model_name, pairs, labels, tracking_uri=cfg.mlflow.tracking_uri,
                                           challenger_fpr95=reg.fpr95)
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
    rows = [LEADERBOARD_HEADER, *(r.row() for r in reports),
            (SIFT_NAME, "untrained baseline", f"{sift_fpr:.4f}", f"{sift_ap:.4f}", "-", "-", "-")]
    table = text_table(rows)
    if curves:
        guarded("logging the plots", lambda: _log_plots(client, parent_id, {**curves, "sift": sift_distances}, labels))
    guarded("logging leaderboard.txt", lambda: client.log_text(parent_id, table + "\n", "leaderboard.txt"))
    guarded(f"logging sift/{METRIC}", lambda: client.log_metric(parent_id, f"sift/{METRIC}", sift_fpr))
    finish_run(client, parent_id, "FINISHED", str(first.run.storage_path).rstrip("/"))
    return SweepReport(sweep_id, parent_id, uri, reports, len(labels), sift_fpr, sift_ap, table, time.perf_counter() - t0)


# ---- evaluate ------------------------------------------------------------------------------------


@dataclass
class ModelScore:
    name: str
    fpr95: float
    fpr95_low: float  # 95% bootstrap interval
    fpr95_high: float
    ap: float


@dataclass
class SequenceEvaluation:
    images: str
    seed: int
    pairs: int
    positives: int
    scores: list[ModelScore]  # SIFT first, then the models in the order given
    mlflow_run_id: str | None = None
    tracking_uri: str | None = None
    seconds: float = 0.0

    def table(self) -> str:
        rows = [("model", "FPR95", "95% interval", "AP")]
        rows += [(s.name, f"{s.fpr95:.4f}", f"[{s.fpr95_low:.4f}, {s.fpr95_high:.4f}]", f"{s.ap:.4f}") for s in self.scores]
        return text_table(rows)


def evaluate_sequence(
    images: str | Path,
    models: Sequence[str] = (),
    *,
    n_pairs: int | None = None,
    seed: int = 0,
    redetect: bool = False,
    experiment: str | None = "patchflow-evaluation",
) -> SequenceEvaluation:
    """FPR95 (with a bootstrap interval) and AP of each model (MLflow URI or checkpoint folder) and of
    kornia's SIFT on real pairs from an image sequence; logged as one MLflow run in ``experiment``
    (None: not logged; an MLflow failure is a warning, the figures are returned all the same).

    Images of a sequence that differ in size from image 1 are warned about (a homography file for
    other images is the usual cause); fewer than ``MIN_POSITIVES`` positive pairs is an error, not a
    figure: FPR95 at 95% recall on a handful of positives says nothing."""
    from pipeline.data.sequences import sequence_pairs

    t0 = time.perf_counter()
    if n_pairs is not None and n_pairs < 2 * MIN_POSITIVES:
        raise ConfigError(f"--pairs {n_pairs}: expected at least {2 * MIN_POSITIVES} pairs per sequence (half of them "
                          f"positive; FPR95 needs {MIN_POSITIVES} positives)")
    loaded = {spec: load_model(spec) for spec in models}  # a bad --model fails before the pairs are cut
    sizes = _image_size_mismatches(images)
    if sizes:
        log.warning("%s: images differ in size from image 1 (%s): check that each homography file belongs to its "
                    "images", images, sizes)
    try:
        pairs, labels, _ = sequence_pairs(images, n_pairs=n_pairs, seed=seed, redetect=redetect, progress=True)
    except SourceError as e:
        raise SourceError(f"{e} (image sizes differ: {sizes})" if sizes else str(e)) from None
    if int(labels.sum()) < MIN_POSITIVES:
        raise SourceError(f"{images}: only {int(labels.sum())} positive pairs ({len(labels)} pairs) survived the homography "
                        f"checks; FPR95 needs at least {MIN_POSITIVES}" + (f" (image sizes: {sizes})" if sizes else ""))
    named = {SIFT_NAME: SIFT(pairs.shape[-1]), **loaded}
    scores = []
    for name, model in named.items():
        d = pair_distances(model, pairs)
        lo, hi = bootstrap_interval(d, labels, fpr_at_95_recall, seed=seed)
        scores.append(ModelScore(name, fpr_at_95_recall(d, labels), lo, hi, average_precision(d, labels)))
    report = SequenceEvaluation(str(images), seed, len(labels), int(labels.sum()), scores)
    if experiment is not None:
        report.tracking_uri, report.mlflow_run_id = guarded(
            "logging the evaluation", lambda: _log_evaluation(report, experiment, redetect), (None, None))
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


def _log_evaluation(report: SequenceEvaluation, experiment: str, redetect: bool) -> tuple[str, str]:
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(None)
    client = MlflowClient(uri)
    run = client.create_run(get_or_create_experiment(client, experiment),
                            run_name=f"evaluate-{Path(report.images).name}", tags={"patchflow.kind": "evaluation"})
    logger = RunLogger(uri, run.info.run_id)
    logger.params({"images": str(Path(report.images).resolve()), "pairs": report.pairs, "seed": report.seed,
                   "redetect": redetect, "models": ",".join(s.name for s in report.scores)})
    for i, s in enumerate(report.scores):
        key = "sift" if s.name.startswith("sift") else f"model{i}"
        values = {"fpr95": s.fpr95, "fpr95_low": s.fpr95_low, "fpr95_high": s.fpr95_high, "ap": s.ap}
        logger.metrics({f"{key}/{k}": v for k, v in values.items()}, step=0)
        logger.tags({f"{key}.name": s.name})
    client.set_terminated(run.info.run_id, "FINISHED")
    return uri, run.info.run_id


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
                       min_improvement: float = 0.0, dry_run: bool = False) -> Promotion:
    """The promotion gate on the eval split of ``shards``, by default the shards the challenger was
    registered against (its ``data_shards`` tag)."""
    from mlflow.tracking import MlflowClient

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


__all__ = ["ArchitectureReport", "ExportOutcome", "ModelScore", "SequenceEvaluation", "SweepReport", "TrainOutcome",
           "evaluate_sequence", "export_model", "load_model", "promote_registered", "register", "sweep", "sync", "train"]
