"""Distributed training of one descriptor: Ray Train V2 ``TorchTrainer`` + DDP.

    patchflow train --config configs/train.yaml [--set train.epochs=5 ...]

Every rank streams its own shards (``pipeline.data.stream``) and runs the same number of steps;
every epoch rank 0 evaluates FPR95 on the eval shards with the unwrapped module (a DDP forward on
one rank would wait for the others), the figure is shared with every rank, and all ranks call
``ray.train.report`` (rank 0 with the checkpoint). The checkpoint carries model, optimizer, step
and the MLflow run id, so a restart continues the same run at the same step.

With ``train.time_budget_s`` the first epoch runs until rank 0 has timed its steps; it then plans
``batches_per_epoch`` (``pipeline.budget``), every rank takes rank 0's plan, and every later epoch
starts with a re-plan of the epochs left from what rank 0 measured in the previous one (a probe
taken under passing load no longer sizes the whole run). The checkpoint carries the plan, so a
restarted run goes on with the schedule it had.
"""

from __future__ import annotations

import io
import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pipeline.augment import fliprot, make_jitter
from pipeline.budget import StepPlan, StepTimer, format_duration, plan_steps
from pipeline.checkpoint import build_model, load_state, save_state
from pipeline.config import Config
from pipeline.data.shards import shard_paths, verify_checksums
from pipeline.data.stream import check_shard_count, load_eval_split, train_loader
from pipeline.device import DevicePlan, plan_for
from pipeline.evaluate import METRIC, PCA_FIT_PAIRS, evaluate_pairs, fit_descriptor_pca, pair_distances
from pipeline.hooks import TrainHooks
from pipeline.objectives import PairObjective
from pipeline.pca import attach_pca, pca_head_dim

log = logging.getLogger(__name__)

# The first epoch of a budgeted run reads until the plan says where it ends.
UNPLANNED = 2**31 - 1
# Per epoch, on top of the timed evaluation and checkpoint write: Ray persisting the checkpoint,
# the report round trip and the next epoch's loader start (measured ~0.3-0.6 s on 2 CPUs).
EPOCH_ALLOWANCE_S = 1.0


@dataclass
class EpochStats:
    """One rank's figures for one epoch, before they are shared across ranks."""

    loss_sum: float = 0.0
    batches: int = 0
    skipped: int = 0
    seconds: float = 0.0
    lr: float = 0.0


class _Worker:
    """One rank's training run. ``__init__`` is the setup (model, optimizer, restored position,
    data, tracking); then per epoch ``train_epoch`` -> ``evaluate`` -> ``report``."""

    def __init__(self, loop_config: dict[str, Any]) -> None:
        import ray.train
        import ray.train.torch

        self.cfg = cfg = Config.model_validate(loop_config["config"])
        self.hooks: TrainHooks = loop_config.get("hooks") or TrainHooks()
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.plan: DevicePlan = plan_for(cfg.scaling.use_gpu, ray.train.torch.get_device())
        torch.set_num_threads(cfg.train.torch_threads or max(1, int(cfg.scaling.cpus_per_worker)))
        torch.manual_seed(cfg.train.seed)  # same initial weights on every rank (DDP also broadcasts)

        model = build_model(cfg)
        if self.plan.channels_last:
            model = model.to(memory_format=torch.channels_last)
        t = cfg.train
        self.base_lr = t.lr * (t.batch_size / t.lr_reference_batch if t.lr_reference_batch else 1.0)
        if t.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(model.parameters(), lr=self.base_lr, momentum=t.momentum, weight_decay=t.weight_decay)
        else:
            self.optimizer = torch.optim.Adam(model.parameters(), lr=self.base_lr, weight_decay=t.weight_decay)
        self.start_epoch, self.step, self.run_id = 0, 0, loop_config.get("mlflow_run_id")
        # The budget's clock started when the trainer was built; a resumed run goes on from the
        # time its checkpoint had used (the time it was down does not count).
        self.budget_start = loop_config.get("budget_start") or time.time()
        self.step_plan: StepPlan | None = None
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                state = load_state(d)
            model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.start_epoch, self.step = state["epoch"] + 1, state["step"]
            self.run_id = state["mlflow_run_id"] or self.run_id
            if state.get("plan"):
                self.step_plan = StepPlan.from_dict(state["plan"])
                self.budget_start = time.time() - state["budget_elapsed_s"]
        self.history: list[dict[str, Any]] = state.get("metrics", []) if checkpoint is not None else []
        self.loss_rng = torch.Generator().manual_seed(t.seed * 7919 + self.rank)  # in-batch negatives
        # DDP wraps the objective (model + loss), so everything the loss uses is inside one forward.
        self.objective = ray.train.torch.prepare_model(PairObjective(model, cfg.model.arch, cfg.loss, self.loss_rng))
        self.model = model  # unwrapped: evaluation and checkpoints

        urls = loop_config.get("shard_urls") or {s: shard_paths(cfg.data.shards, s) for s in ("train", "eval")}
        self.train_urls = urls["train"]
        check_shard_count(len(self.train_urls), self.world, cfg.data.loader_workers)
        # Steps per epoch: configured, or planned from measured speed (the first epoch times its
        # steps; a checkpoint without a plan keeps the configured count).
        self.timer = StepTimer(t.budget_warmup_steps, t.budget_probe_steps) if (
            t.time_budget_s and self.step_plan is None and checkpoint is None) else None
        self.batches_per_epoch: int | None = None if self.timer else t.batches_per_epoch
        if self.step_plan is not None:
            self.batches_per_epoch = self.step_plan.batches_per_epoch
        self.first_batch_s = 0.0
        # The last epoch's timing, for the re-plan at the next one's start: (time, steps) when its steady
        # part started (the first batch, or the first plan), its end, and the step time. Every rank
        # measures (a few time.time() calls); only rank 0's figures plan, and the plan is broadcast.
        self.steady_start: tuple[float, int] | None = None
        self.steps_ended_at: float | None = None
        self.measured_step_s: float | None = None
        self.logger = None
        if self.rank == 0:  # only rank 0 logs: the other ranks never import MLflow (~2 CPU-s per process)
            from pipeline.tracking import RunLogger

            self.logger = RunLogger(loop_config["tracking_uri"], self.run_id)
            # The checkpoint carries every epoch's metrics: what MLflow lacks (an outage, a kill after the
            # report) is sent now; ``once_key`` skips epochs MLflow has, asked when the server answers.
            for metrics in self.history:
                self.logger.metrics(metrics, step=metrics["epoch"], once_key=METRIC)
            self.eval_pairs, self.eval_labels, _ = load_eval_split(cfg.data, urls["eval"])  # checksums verified again here
        self.augment_rng = torch.Generator().manual_seed(t.seed * 1000 + self.rank)
        self.jitter = make_jitter(t.augment_rotation_deg, t.augment_scale)

    @property
    def total_steps(self) -> int | None:
        """None while a budgeted run is still timing its first steps."""
        if self.step_plan is not None:
            return self.step_plan.total_steps
        return None if self.batches_per_epoch is None else self.cfg.train.epochs * self.batches_per_epoch

    def _lr(self) -> float:
        # The probe steps of a budgeted run, before the plan exists, run at the base lr (their
        # decay, 1 - step/total_steps, would differ from 1 by a few per mille).
        if self.cfg.train.lr_schedule != "linear_to_zero" or self.total_steps is None:
            return self.base_lr
        if self.step_plan is not None:  # continuous across re-plans
            return self.base_lr * self.step_plan.lr_scale(self.step)
        return self.base_lr * (1.0 - self.step / self.total_steps)

    def budget_elapsed_s(self) -> float:
        return time.time() - self.budget_start

    def _estimate_eval_s(self) -> float:
        """Rank 0: one epoch-end evaluation + checkpoint, from a timed evaluation of a slice of the
        eval pairs scaled to all of them (and to the PCA fit's patches, when a head is fitted), a
        timed checkpoint write and ``EPOCH_ALLOWANCE_S``."""
        n = len(self.eval_labels)
        k = min(n, 2 * self.plan.eval_batch_size)
        was_training = self.model.training
        t0 = time.perf_counter()
        pair_distances(self.model, self.eval_pairs[:k], self.plan)
        per_pair = (time.perf_counter() - t0) / k
        self.model.train(was_training)  # a pair classifier's distance leaves it in eval mode
        fits_pca = pca_head_dim(self.model) is not None or self.cfg.model.attached_pca_dim is not None
        t0 = time.perf_counter()
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}, io.BytesIO())
        save_s = time.perf_counter() - t0
        return per_pair * (n + (PCA_FIT_PAIRS if fits_pca else 0)) + save_s + self.first_batch_s + EPOCH_ALLOWANCE_S

    def _plan(self, epochs_done: int) -> None:
        """Fix batches_per_epoch from rank 0's timing: the first plan inside the first epoch (from the
        probe and an estimated epoch end), a re-plan of the epochs left at every later epoch's start
        (from the previous epoch's measured step and epoch-end times; a resumed run's first re-plan
        takes its checkpointed plan's figures). Every rank takes rank 0's plan (one broadcast, at
        the same step on every rank), and rank 0 logs it to MLflow at step ``epochs_done``."""
        t = self.cfg.train
        fields = torch.zeros(11, dtype=torch.float64)
        if self.rank == 0:
            old = self.step_plan
            if old is None:
                step_s, eval_s = self.timer.step_s, self._estimate_eval_s()
            else:
                step_s = self.measured_step_s or old.step_s
                eval_s = (time.time() - self.steps_ended_at + self.first_batch_s) if self.steps_ended_at else old.eval_s
            p = plan_steps(budget_s=t.time_budget_s, elapsed_s=self.budget_elapsed_s(), steps_done=self.step,
                           step_s=step_s, eval_s=eval_s, epochs=t.epochs, pairs_per_step=t.batch_size * self.world,
                           epochs_done=epochs_done, lr_start_step=self.step if old else 0,
                           lr_start_scale=old.lr_scale(self.step) if old else 1.0)
            fields = torch.tensor([p.budget_s, p.epochs, p.batches_per_epoch, p.step_s, p.pairs_per_s, p.eval_s,
                                   p.elapsed_s, p.steps_done, p.epochs_done, p.lr_start_step, p.lr_start_scale],
                                  dtype=torch.float64)
        if self.world > 1 and dist.is_available() and dist.is_initialized():
            fields = fields.to(self.plan.device)
            dist.broadcast(fields, src=0)
            fields = fields.cpu()
        v = fields.tolist()
        self.step_plan = StepPlan(budget_s=v[0], epochs=int(v[1]), batches_per_epoch=int(v[2]), step_s=v[3],
                                  pairs_per_s=v[4], eval_s=v[5], elapsed_s=v[6], steps_done=int(v[7]),
                                  epochs_done=int(v[8]), lr_start_step=int(v[9]), lr_start_scale=v[10])
        self.batches_per_epoch, self.timer = self.step_plan.batches_per_epoch, None
        if self.rank == 0:
            p = self.step_plan
            what = (f"{p.epochs} epochs x {p.batches_per_epoch} batches" if not p.epochs_done else
                    f"re-planned at epoch {p.epochs_done + 1}: {p.epochs - p.epochs_done} epochs x {p.batches_per_epoch} batches left")
            log.info("time budget %s: %s (%.0f pairs/s measured, %.1f s per epoch end)%s",
                     format_duration(p.budget_s), what, p.pairs_per_s, p.eval_s,
                     "" if p.fits else f"; the shortest plan ends at {format_duration(p.projected_s)}, over the budget")
            self.logger.metrics(p.mlflow_metrics(), step=p.epochs_done)

    def plan_state(self) -> dict[str, Any]:
        """The checkpoint's part: the plan and the budget time used so far (a resumed run keeps both)."""
        if self.step_plan is None:
            return {}
        return {"plan": self.step_plan.as_dict(), "budget_elapsed_s": self.budget_elapsed_s()}

    def budget_metrics(self) -> dict[str, float]:
        """What each epoch's report adds: the planned epochs and steps, and with a budget the time left."""
        out = {"planned_epochs": self.cfg.train.epochs, "planned_steps": self.total_steps}
        if self.step_plan is not None:
            out["budget_left_s"] = self.step_plan.budget_s - self.budget_elapsed_s()
        return out

    def train_epoch(self, epoch: int) -> EpochStats:
        cfg, rank = self.cfg, self.rank
        # Every random stream restarts per (seed, epoch, rank): an epoch re-run after a restart from
        # the previous epoch's checkpoint draws the same data order, augmentations and dropout masks.
        epoch_seed = cfg.train.seed * 1_000_003 + epoch * 1009 + rank
        self.augment_rng.manual_seed(epoch_seed)
        self.loss_rng.manual_seed(epoch_seed)
        torch.manual_seed(epoch_seed)
        if self.step_plan is not None and epoch > self.step_plan.epochs_done:
            self._plan(epochs_done=epoch)
        loader = train_loader(
            self.train_urls,
            loader_workers=cfg.data.loader_workers,
            rank=rank,
            world_size=self.world,
            epoch=epoch,
            batch_size=cfg.train.batch_size,
            batches_per_epoch=self.batches_per_epoch or UNPLANNED,
            shuffle_buffer=cfg.data.shuffle_buffer,
            seed=cfg.train.seed,
        )
        self.objective.train()
        stats, t0 = EpochStats(lr=self._lr()), time.perf_counter()
        if self.timer is not None:
            self.timer.start()
        for batch in loader:
            if stats.batches == 0:
                self.first_batch_s = time.perf_counter() - t0  # the loader's start, paid again every epoch
                self.steady_start = (time.time(), 0)
            self.hooks.on_batch(batch, rank=rank)
            pairs = batch["pairs"]
            stats.skipped += batch["skipped"]
            if cfg.train.augment:
                pairs = fliprot(pairs, self.augment_rng)
            b, _, p, _ = pairs.shape
            x = self.plan.prepare_batch(pairs.reshape(b * 2, 1, p, p))  # a0, p0, a1, p1, ...
            if self.jitter is not None:
                x = self.jitter(x)
            stats.lr = self._lr()
            for group in self.optimizer.param_groups:
                group["lr"] = stats.lr
            with self.plan.autocast():
                loss = self.objective(x)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.hooks.after_backward(rank=rank, epoch=epoch, step=self.step)
            self.optimizer.step()
            self.step += 1
            stats.loss_sum += loss.item()
            stats.batches += 1
            if self.timer is not None and self.timer.step_done(stats.batches):
                self._plan(epochs_done=0)
                self.steady_start = (time.time(), stats.batches)  # the probe's own steps include the warm-up
            if stats.batches == self.batches_per_epoch:
                break  # a planned first epoch (its loader was opened without an end)
        stats.seconds = time.perf_counter() - t0
        self.steps_ended_at = time.time()
        if self.steady_start is not None and stats.batches - self.steady_start[1] >= 3:
            self.measured_step_s = (self.steps_ended_at - self.steady_start[0]) / (stats.batches - self.steady_start[1])
        self.steady_start = None
        return stats

    def evaluate(self) -> tuple[float, tuple[torch.Tensor, torch.Tensor] | None]:
        """Rank 0: fit the PCA head if the model has one, then FPR95 on the eval pairs. Returns the
        figure (0.0 on other ranks) and the (components, mean) of an attached head, for the checkpoint."""
        if self.rank != 0:
            return 0.0, None
        core, pca, eval_model = self.model, None, self.model
        if pca_head_dim(core) is not None:  # the model's own head (HardNet8)
            core.set_pca(*fit_descriptor_pca(core, self.train_urls, core.pca_dim, self.plan, method="embed"))
        elif self.cfg.model.attached_pca_dim:
            pca = fit_descriptor_pca(core, self.train_urls, self.cfg.model.attached_pca_dim, self.plan,
                                     fit=self.cfg.model.pca_fit)
            eval_model = attach_pca(core, *pca)
        return evaluate_pairs(eval_model, self.eval_pairs, self.eval_labels, self.plan)[METRIC], pca

    def report(self, epoch: int, stats: EpochStats, fpr: float, pca) -> None:
        """Share the epoch's figures across ranks, report them to Ray (rank 0 with the checkpoint)
        and log them to MLflow (rank 0, once per epoch)."""
        import ray.train

        rank, world = self.rank, self.world
        # One collective: mean train loss over ranks, rank 0's FPR95 to everyone, skipped samples summed.
        shared = torch.tensor([stats.loss_sum / max(1, stats.batches), fpr, stats.skipped], dtype=torch.float64)
        if world > 1 and dist.is_available() and dist.is_initialized():
            shared = shared.to(self.plan.device)
            dist.all_reduce(shared)
            shared = shared.cpu()
            shared[0] /= world
        metrics = {
            "epoch": epoch + 1,
            "step": self.step,
            "train_loss": float(shared[0]),
            METRIC: float(shared[1]),
            "data/skipped_samples": int(shared[2]),
            "mlflow_run_id": self.run_id or "",
            "lr": stats.lr,
            "pairs_per_s": stats.batches * self.cfg.train.batch_size * world / stats.seconds if stats.seconds > 0 else math.nan,
            **self.budget_metrics(),
        }
        self.hooks.end_of_epoch(rank=rank, epoch=epoch, model=self.model)
        if rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        # Logged before the checkpoint is reported, and carried in it: a kill after the report loses nothing.
        # Epochs are deterministic (seeded per epoch), so a re-run epoch's figures are the same: logged once.
        self.history.append(metrics)
        self.logger.metrics(metrics, step=epoch + 1, once_key=METRIC)
        with tempfile.TemporaryDirectory() as tmp:
            save_state(Path(tmp), model=self.model, optimizer=self.optimizer, epoch=epoch, step=self.step,
                       mlflow_run_id=self.run_id, cfg=self.cfg, pca=pca, metrics=self.history, extra=self.plan_state())
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def epoch_line(label: str, metrics: dict[str, Any]) -> str:
    """The console's line for one reported epoch (rank 0's metrics): where the run is, its speed,
    its eval FPR95 and, with a budget, the time left."""
    parts = [f"epoch {metrics['epoch']}/{metrics.get('planned_epochs', '?')}"]
    if metrics.get("planned_steps"):
        parts.append(f"step {metrics['step']}/{metrics['planned_steps']}")
    parts += [f"{metrics.get('pairs_per_s', math.nan):.0f} pairs/s", f"eval FPR95 {metrics[METRIC]:.4f}"]
    left = metrics.get("budget_left_s")
    if left is not None:
        parts.append(f"{format_duration(left)} of the budget left" if left >= 0 else f"{format_duration(-left)} over the budget")
    return f"[patchflow] {label}: " + ", ".join(parts)


def epoch_lines(label: str, relay) -> Any:
    """A Ray Train callback sending ``epoch_line`` for every report to ``relay``
    (``pipeline.cluster.line_relay``): it runs in the Train controller actor, not in this process."""
    from ray.train import UserCallback

    class EpochLines(UserCallback):
        def after_report(self, run_context, metrics, checkpoint) -> None:
            relay.add.remote(epoch_line(label, metrics[0]))

    return EpochLines()


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    worker = _Worker(loop_config)
    for epoch in range(worker.start_epoch, worker.cfg.train.epochs):
        stats = worker.train_epoch(epoch)
        fpr, pca = worker.evaluate()
        worker.report(epoch, stats, fpr, pca)
    if worker.logger is not None:  # rank 0: flush; what MLflow still lacks goes beside the checkpoints
        import ray.train

        worker.logger.close(f"{str(worker.cfg.run.storage_path).rstrip('/')}/{ray.train.get_context().get_experiment_name()}")


def preflight(cfg: Config) -> dict[str, list[str]]:
    """Data checks that must fail before Ray starts: manifest readable, shards present, checksums
    match (or bad shards left out with ``data.on_bad_checksum: skip``), enough shards for every
    rank. Returns the shard paths per split that training should read."""
    urls = {}
    for split in ("train", "eval"):
        paths = shard_paths(cfg.data.shards, split)
        if cfg.data.verify_checksums:
            paths = verify_checksums(cfg.data.shards, split, paths, on_bad=cfg.data.on_bad_checksum)
        urls[split] = paths
    world = max(1, cfg.sweep.workers_per_trial if cfg.sweep else cfg.scaling.num_workers)
    check_shard_count(len(urls["train"]), world, cfg.data.loader_workers)
    return urls


def build_trainer(
    cfg: Config,
    *,
    name: str,
    tracking_uri: str,
    mlflow_run_id: str | None,
    callbacks=None,
    num_workers: int | None = None,
    hooks: TrainHooks | None = None,
    shard_urls: dict[str, list[str]] | None = None,
):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.cluster import check_shared_storage

    check_shared_storage(str(cfg.run.storage_path))  # before any worker starts writing checkpoints
    plan = plan_for(cfg.scaling.use_gpu)
    workers = cfg.scaling.num_workers if num_workers is None else num_workers
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": cfg.model_dump(mode="json"),
            "tracking_uri": tracking_uri,
            "mlflow_run_id": mlflow_run_id,
            "shard_urls": shard_urls,
            "hooks": hooks,
            "budget_start": time.time(),  # train.time_budget_s counts from here (workers' start-up included)
        },
        torch_config=TorchConfig(backend=plan.ddp_backend),
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=cfg.scaling.use_gpu, resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str(cfg.run.storage_path),
            # Every epoch's checkpoint is kept (a few MB each): restarts need the latest, registration
            # wants the best epoch, and Ray's score-based pruning can drop the latest.
            checkpoint_config=CheckpointConfig(num_to_keep=None, checkpoint_score_attribute=METRIC, checkpoint_score_order="min"),
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            callbacks=list(callbacks or []),
        ),
    )
