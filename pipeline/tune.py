"""Hyperparameter sweep: Ray Tune over Ray Train, with ASHA on eval FPR95.

    patchflow sweep --config configs/sweeps/demo.yaml

Train V2 pattern: a Tune trial is a function that builds and fits a ``TorchTrainer`` whose
``TuneReportCallback`` forwards rank 0's per-epoch metrics (and checkpoint path) to Tune.

Why it cannot deadlock on a small machine: a trial's driver function holds no CPU (it only waits
on its trainer) but one ``trial_slot`` custom resource, and at most
``floor(CPUs / (workers_per_trial x cpus_per_worker))`` trials (GPUs: ``floor(GPUs /
workers_per_trial)``) run at once, so every running trial's workers always fit.

MLflow: one parent run per sweep, one child run per trial (``mlflow.parentRunId``), per-epoch
metrics logged by the trial's rank 0.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from pipeline.budget import format_duration
from pipeline.cluster import TRIAL_SLOT, init_ray
from pipeline.config import Config, ConfigError, SearchDomain, SweepConfig
from pipeline.evaluate import METRIC
from pipeline.tracking import RunLogger, get_or_create_experiment, resolve_tracking_uri
from pipeline.train import build_trainer, epoch_line, preflight

log = logging.getLogger(__name__)


@dataclass
class TrialOutcome:
    trial_id: str
    params: dict[str, Any]
    fpr95: float  # the trial's score: eval FPR95 of its best epoch, or its last (sweep.scope)
    epochs: int
    checkpoint_path: str | None
    mlflow_run_id: str | None
    error: str | None = None
    scored_epoch: int = 0  # the epoch fpr95 and checkpoint_path are from (0: none)


@dataclass
class SweepResult:
    sweep_id: str
    parent_run_id: str
    trials: list[TrialOutcome]

    @property
    def best(self) -> TrialOutcome:
        done = [t for t in self.trials if t.checkpoint_path and not math.isnan(t.fpr95)]
        if not done:
            raise RuntimeError(f"sweep {self.sweep_id}: no trial produced a checkpoint; see the trial errors above")
        return min(done, key=lambda t: t.fpr95)


def effect_of(trials: list[TrialOutcome], key: str) -> list[tuple[Any, float, int]]:
    """(value, best eval FPR95, trials) for each value of a searched key, e.g. ``loss.mc_mu``:
    the with / without comparison for an auxiliary loss."""
    by_value: dict[Any, list[float]] = {}
    for t in trials:
        if key in t.params and not math.isnan(t.fpr95):
            by_value.setdefault(t.params[key], []).append(t.fpr95)
    return [(value, min(fprs), len(fprs)) for value, fprs in sorted(by_value.items())]


def _domain(d: SearchDomain):
    from ray import tune

    if d.grid is not None:
        return tune.grid_search(d.grid)
    if d.choice is not None:
        return tune.choice(d.choice)
    if d.uniform is not None:
        return tune.uniform(*d.uniform)
    return tune.loguniform(*d.loguniform)


def max_concurrent_trials(sweep: SweepConfig, cfg: Config, resources: dict[str, float]) -> int:
    """How many trials fit at once, so that every running trial's workers can be placed."""
    if cfg.scaling.use_gpu:
        fit = int(resources.get("GPU", 0) // sweep.workers_per_trial)
    else:
        fit = int(resources.get("CPU", 0) // (sweep.workers_per_trial * cfg.scaling.cpus_per_worker))
    if TRIAL_SLOT in resources:
        fit = min(fit, int(resources[TRIAL_SLOT]))
    if sweep.max_concurrent_trials is not None:
        fit = min(fit, sweep.max_concurrent_trials)
    if fit < 1:
        raise ConfigError(
            f"sweep.workers_per_trial: {sweep.workers_per_trial} worker(s) per trial do not fit in the cluster's "
            f"resources {resources}; lower it or add nodes"
        )
    return fit


def _trial(
    params: dict[str, Any],
    *,
    base: dict,
    tracking_uri: str,
    experiment_id: str,
    parent_run_id: str,
    sweep_id: str,
    shard_urls: dict[str, list[str]],
) -> None:
    """One Tune trial: build and fit a TorchTrainer for this point of the search space."""
    from mlflow.tracking import MlflowClient
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = Config.model_validate(base).with_updates(params)
    ctx = tune.get_context()
    trial_id = ctx.get_trial_id()
    client = MlflowClient(tracking_uri)
    # A resumed sweep restarts unfinished trials: they go on logging into their own child run.
    existing = client.search_runs(
        [experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`patchflow.trial_id` = '{trial_id}'"
    )
    if existing:
        run_id = existing[0].info.run_id
        client.update_run(run_id, status="RUNNING")
    else:
        run_id = client.create_run(
            experiment_id,
            run_name=ctx.get_trial_name(),
            tags={"mlflow.parentRunId": parent_run_id, "patchflow.sweep_id": sweep_id, "patchflow.trial_id": trial_id,
                  "patchflow.arch": cfg.model.arch},
        ).info.run_id
    logger = RunLogger(tracking_uri, run_id)
    logger.params(cfg.model_dump(mode="json"))
    logger.tags({f"search.{k}": v for k, v in params.items()})
    trainer = build_trainer(
        cfg,
        name=f"{sweep_id}_{trial_id}",
        tracking_uri=tracking_uri,
        mlflow_run_id=run_id,
        callbacks=[TuneReportCallback()],
        num_workers=cfg.sweep.workers_per_trial if cfg.sweep else None,
        shard_urls=shard_urls,
    )
    # The terminal status is the driver's to set (run_sweep, from Tune's record): Tune kills this
    # actor when it stops the trial (ASHA, max_t), and a status written here while it dies could
    # land after the driver's and overwrite FINISHED with FAILED.
    trainer.fit()


def _outcome(result, mlflow_runs: dict[str, str], scope: str = "all") -> TrialOutcome:
    """One trial's score and checkpoint from its Ray Tune result: the epoch with the lowest eval FPR95
    (scope "all"), or its last epoch (scope "last"; every epoch's checkpoint is kept, so it exists)."""
    trial_id = result.path.rstrip("/").split("/")[-1]
    df = result.metrics_dataframe
    params = {k: v for k, v in (result.config or {}).items()}
    scored = df.dropna(subset=[METRIC]) if df is not None and METRIC in df else None
    if scored is None or scored.empty:
        return TrialOutcome(trial_id, params, math.nan, 0, None, None, error=str(result.error) if result.error else "no metrics")
    epoch = scored.iloc[-1] if scope == "last" else scored.loc[scored[METRIC].idxmin()]
    trial_key = str(df["trial_id"].iloc[-1]) if "trial_id" in df else trial_id
    return TrialOutcome(
        trial_id=trial_key,
        params=params,
        fpr95=float(epoch[METRIC]),
        epochs=int(df["epoch"].max()),
        checkpoint_path=epoch.get("checkpoint_path"),
        mlflow_run_id=mlflow_runs.get(trial_key),
        error=str(result.error) if result.error else None,
        scored_epoch=int(epoch["epoch"]),
    )


def _trial_lines(arch: str, say: Callable[[str], None]):
    """A Tune callback (it runs in this process) printing one line per trial and epoch, and one
    when a trial ends early (ASHA) or fails: the console's view of a sweep instead of Tune's table."""
    from ray.tune import Callback

    class TrialLines(Callback):
        def __init__(self) -> None:
            self.last: dict[str, dict] = {}

        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            self.last[trial.trial_id] = result
            say(epoch_line(f"{arch} {trial.trial_id}", result))

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            last = self.last.get(trial.trial_id, {})
            if last and last.get("epoch", 0) < last.get("planned_epochs", 0):
                say(f"[patchflow] {arch} {trial.trial_id}: stopped by ASHA after epoch {last['epoch']}/{last['planned_epochs']}")

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            say(f"[patchflow] {arch} {trial.trial_id}: failed; its error is in {trial.error_file or trial.local_path}")

    return TrialLines()


def _new_tuner(cfg: Config, sweep: SweepConfig, trainable, concurrent: int, name: str, *, verbose: bool = False,
               callbacks: list | None = None):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    scheduler = None  # FIFO: every trial runs to the end
    if sweep.scheduler == "asha":
        scheduler = ASHAScheduler(
            time_attr="epoch",
            max_t=cfg.train.epochs,
            grace_period=min(sweep.grace_period, cfg.train.epochs),
            reduction_factor=sweep.reduction_factor,
        )
    if sweep.search_alg == "optuna":
        from ray.tune.search.optuna import OptunaSearch  # needs `pip install optuna`

        search_alg = OptunaSearch(seed=cfg.train.seed)
        limit = concurrent  # Tune wraps a Searcher in a ConcurrencyLimiter
    else:  # seeded, so re-running a sweep (or comparing schedulers) samples the same configs
        from ray.tune.search.basic_variant import BasicVariantGenerator

        # a SearchGenerator: Tune ignores max_concurrent_trials for it, so it gets the limit itself
        search_alg, limit = BasicVariantGenerator(max_concurrent=concurrent, random_state=cfg.train.seed), None
    return tune.Tuner(
        trainable,
        param_space={key: _domain(d) for key, d in sweep.search_space.items()},
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode="min",
            scheduler=scheduler,
            search_alg=search_alg,
            num_samples=sweep.num_samples,
            max_concurrent_trials=limit,
        ),
        # verbose=0: no status table every 30 s; the callbacks print one line per trial and epoch
        run_config=tune.RunConfig(name=name, storage_path=str(cfg.run.storage_path), verbose=1 if verbose else 0,
                                  callbacks=callbacks),
    )


def new_sweep_id() -> str:
    return f"sweep-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def start_parent_run(cfg: Config, sweep_id: str, configs: list[Config]) -> str:
    """One MLflow parent run per sweep, holding every architecture's validated config."""
    from mlflow.tracking import MlflowClient

    tracking_uri = resolve_tracking_uri(cfg.mlflow.tracking_uri)
    client = MlflowClient(tracking_uri)
    experiment_id = get_or_create_experiment(client, cfg.mlflow.experiment)
    parent = client.create_run(experiment_id, run_name=sweep_id, tags={"patchflow.sweep_id": sweep_id, "patchflow.kind": "sweep"})
    client.log_dict(parent.info.run_id, {c.model.arch: c.model_dump(mode="json") for c in configs}, "sweep_config.json")
    RunLogger(tracking_uri, parent.info.run_id).params({"architectures": ",".join(c.model.arch for c in configs)})
    return parent.info.run_id


def find_sweep(sweep_id: str, tracking_uri: str | None = None) -> tuple[str, list[Config]]:
    """The parent run of ``sweep_id`` and the validated configs it was started with."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(resolve_tracking_uri(tracking_uri))
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, f"tags.`patchflow.sweep_id` = '{sweep_id}' and tags.`patchflow.kind` = 'sweep'")
    if not runs:
        raise ConfigError(f"--resume {sweep_id}: no sweep with that id in {client.tracking_uri}")
    parent = runs[0].info.run_id
    configs = client.download_artifacts(parent, "sweep_config.json")
    import json

    with open(configs) as f:
        return parent, [Config.model_validate(raw) for raw in json.load(f).values()]


def print_progress(line: str) -> None:
    """The console's progress printer (the CLI's default ``progress``), flushed at once."""
    print(line, flush=True)


def run_sweep(
    cfg: Config,
    *,
    sweep_id: str | None = None,
    parent_run_id: str | None = None,
    resume: bool = False,
    shard_urls: dict[str, list[str]] | None = None,
    verbose: bool = True,
    progress: Callable[[str], None] | None = None,
) -> SweepResult:
    """One architecture's Tune run. Without ``parent_run_id`` it is a sweep of its own (its
    parent run is created and closed here); with one, it is that sweep's part for ``model.arch``.
    ``progress`` gets one line per trial and epoch; ``verbose=False`` keeps Tune's status table
    and Ray's own output off the console (``pipeline.cluster.quiet_ray``)."""
    progress = progress or print_progress  # a module function: Tune pickles its callbacks, and builtins.print
    # may be rebound in the driver (then cloudpickle refuses it)
    from mlflow.tracking import MlflowClient
    import ray
    from ray import tune

    sweep = cfg.sweep or SweepConfig()
    arch = cfg.model.arch
    shard_urls = shard_urls or preflight(cfg)  # the caller may have verified the shards already
    tracking_uri = resolve_tracking_uri(cfg.mlflow.tracking_uri)
    client = MlflowClient(tracking_uri)
    experiment_id = get_or_create_experiment(client, cfg.mlflow.experiment)
    sweep_id = sweep_id or new_sweep_id()
    owns_parent = parent_run_id is None
    parent_id = start_parent_run(cfg, sweep_id, [cfg]) if owns_parent else parent_run_id
    parent_log = RunLogger(tracking_uri, parent_id)

    init_ray(verbose=verbose)
    resources = ray.cluster_resources()
    concurrent = max_concurrent_trials(sweep, cfg, resources)
    n_trials = sweep.num_samples * math.prod(len(d.grid) for d in sweep.search_space.values() if d.grid is not None)
    budget = f", {format_duration(cfg.train.time_budget_s)} each" if cfg.train.time_budget_s else ""
    progress(f"[patchflow] sweep {sweep_id} / {arch}: {n_trials} trial(s), {concurrent} at a time, "
             f"{sweep.workers_per_trial} worker(s) each{budget}; MLflow parent run {parent_id}")

    trial_resources = {"cpu": 0, TRIAL_SLOT: 1} if TRIAL_SLOT in resources else {"cpu": 0}
    trainable = tune.with_resources(
        tune.with_parameters(
            _trial,
            base=cfg.model_dump(mode="json"),
            tracking_uri=tracking_uri,
            experiment_id=experiment_id,
            parent_run_id=parent_id,
            sweep_id=sweep_id,
            shard_urls=shard_urls,
        ),
        trial_resources,
    )
    experiment_path = f"{cfg.run.storage_path}/{sweep_id}-{arch}"
    if resume and tune.Tuner.can_restore(experiment_path):
        # finished trials keep their results; unfinished ones restart, and their TorchTrainer
        # (same run name) continues from its latest checkpoint
        progress(f"[patchflow] resuming {experiment_path}")
        # the restored Tuner has its pickled RunConfig: the same verbosity and progress lines
        tuner = tune.Tuner.restore(experiment_path, trainable, resume_unfinished=True, restart_errored=True)
    else:
        tuner = _new_tuner(cfg, sweep, trainable, concurrent, f"{sweep_id}-{arch}", verbose=verbose,
                           callbacks=[_trial_lines(arch, progress)])
    try:
        grid = tuner.fit()
    except BaseException:
        client.set_terminated(parent_id, "KILLED")
        raise

    children = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.`patchflow.arch` = '{arch}'",
        max_results=1000,
    )
    mlflow_runs = {r.data.tags.get("patchflow.trial_id"): r.info.run_id for r in children}
    trials = [_outcome(r, mlflow_runs, cfg.sweep.scope if cfg.sweep else "all") for r in grid]
    # Tune ends a trial's function when it stops it (ASHA, or max_t reached), so the status the
    # trial could set itself is unreliable: set it from Tune's record of each trial.
    for t in trials:
        if t.mlflow_run_id is None:
            continue
        if t.error:
            status = "FAILED"
        elif t.epochs >= cfg.train.epochs:
            status = "FINISHED"
        else:
            status = "KILLED"
            client.set_tag(t.mlflow_run_id, "patchflow.stopped_by", "asha")
        if t.checkpoint_path:
            client.set_tag(t.mlflow_run_id, "patchflow.checkpoint", t.checkpoint_path)  # its scored epoch's (sweep.scope)
        client.set_terminated(t.mlflow_run_id, status)
    result = SweepResult(sweep_id, parent_id, trials)
    ok = [t for t in trials if not math.isnan(t.fpr95)]
    if ok:
        best = result.best
        parent_log.metrics({f"{arch}/best_{METRIC}": best.fpr95, f"{arch}/trials_finished": len(ok)}, step=0)
        parent_log.tags({f"patchflow.{arch}.best_trial": best.trial_id, f"patchflow.{arch}.best_run_id": best.mlflow_run_id or ""})
    client.log_dict(parent_id, {"trials": [t.__dict__ for t in trials]}, f"trials/{arch}.json")
    if owns_parent:
        client.set_terminated(parent_id, "FINISHED" if ok else "FAILED")
    return result
