"""Distributed training of one descriptor: Ray Train V2 ``TorchTrainer`` + DDP.

    patchflow train --config configs/train.yaml [--set train.epochs=5 ...]

Every rank streams its own shards (``pipeline.data.stream``) and runs the same number of steps;
every epoch rank 0 evaluates FPR95 on the eval shards with the unwrapped module (a DDP forward on
one rank would wait for the others), the figure is shared with every rank, and all ranks call
``ray.train.report`` (rank 0 with the checkpoint). The checkpoint carries model, optimizer, step
and the MLflow run id, so a restart continues the same run at the same step.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pipeline.config import Config
from pipeline.data.shards import shard_paths, verify_checksums
from pipeline.data.stream import check_shard_count, load_eval_split, load_pairs, train_loader
from pipeline.augment import fliprot, make_jitter
from pipeline.device import plan_for
from pipeline.evaluate import evaluate_pairs
from pipeline.models import create_model
from pipeline.objectives import PairObjective
from pipeline.tracking import RunLogger

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "state.pt"
METRIC = "eval_fpr95"  # lower is better


def build_model(cfg: Config) -> torch.nn.Module:
    return create_model(cfg.model.arch, **cfg.model.factory_kwargs())


def save_state(
    directory: Path, *, model, optimizer, epoch: int, step: int, mlflow_run_id: str | None, cfg: Config, pca=None
) -> None:
    torch.save(
        {
            "model": model.state_dict(),
            "pca": pca,  # (components, mean) of an attached PCA head, or None
            "optimizer": optimizer.state_dict(),
            "epoch": epoch,
            "step": step,
            "mlflow_run_id": mlflow_run_id,
            "config": cfg.model_dump(mode="json"),
        },
        directory / CHECKPOINT_FILE,
    )


def load_state(checkpoint_dir: str | Path) -> dict[str, Any]:
    return torch.load(Path(checkpoint_dir) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)


def model_from_checkpoint(checkpoint_dir: str | Path) -> tuple[torch.nn.Module, Config]:
    """The trained model, with its PCA head attached when the run fitted one."""
    from pipeline.pca import attach_pca

    state = load_state(checkpoint_dir)
    cfg = Config.model_validate(state["config"])
    model = build_model(cfg)
    model.load_state_dict(state["model"])
    if state.get("pca") is not None:
        model = attach_pca(model, *state["pca"])
    return model.eval(), cfg


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    cfg = Config.model_validate(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    plan = plan_for(cfg.scaling.use_gpu, ray.train.torch.get_device())
    torch.set_num_threads(cfg.train.torch_threads or max(1, int(cfg.scaling.cpus_per_worker)))
    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank (DDP also broadcasts)

    model = build_model(cfg)
    if plan.channels_last:
        model = model.to(memory_format=torch.channels_last)
    base_lr = cfg.train.lr * (cfg.train.batch_size / cfg.train.lr_reference_batch if cfg.train.lr_reference_batch else 1.0)
    if cfg.train.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=base_lr, momentum=cfg.train.momentum, weight_decay=cfg.train.weight_decay)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=base_lr, weight_decay=cfg.train.weight_decay)
    start_epoch, step, run_id = 0, 0, loop_config.get("mlflow_run_id")
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = load_state(d)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, step = state["epoch"] + 1, state["step"]
        run_id = state["mlflow_run_id"] or run_id
    loss_rng = torch.Generator().manual_seed(cfg.train.seed * 7919 + rank)  # in-batch negatives
    # DDP wraps the objective (model + loss), so everything the loss uses is inside one forward.
    objective = ray.train.torch.prepare_model(PairObjective(model, cfg.model.arch, cfg.loss, loss_rng))
    core = model

    urls = loop_config.get("shard_urls") or {s: shard_paths(cfg.data.shards, s) for s in ("train", "eval")}
    train_urls = urls["train"]
    check_shard_count(len(train_urls), world, cfg.data.loader_workers)
    total_steps = cfg.train.epochs * cfg.train.batches_per_epoch
    logger = RunLogger(loop_config["tracking_uri"], run_id) if rank == 0 else None
    # A resumed run can restart from an earlier checkpoint than its last logged epoch, or from none
    # at all (killed before Ray recorded the first checkpoint): epochs already in MLflow are kept.
    logged_epochs = logger.logged_steps(METRIC) if rank == 0 else set()
    if rank == 0:
        eval_pairs, eval_labels, _ = load_eval_split(cfg.data, urls["eval"])  # checksums verified again here
    augment_rng = torch.Generator().manual_seed(cfg.train.seed * 1000 + rank)
    jitter = make_jitter(cfg.train.augment_rotation_deg, cfg.train.augment_scale)

    for epoch in range(start_epoch, cfg.train.epochs):
        # Every random stream restarts per (seed, epoch, rank): an epoch re-run after a restart from
        # the previous epoch's checkpoint draws the same data order, augmentations and dropout masks.
        epoch_seed = cfg.train.seed * 1_000_003 + epoch * 1009 + rank
        augment_rng.manual_seed(epoch_seed)
        loss_rng.manual_seed(epoch_seed)
        torch.manual_seed(epoch_seed)
        loader = train_loader(
            train_urls,
            loader_workers=cfg.data.loader_workers,
            rank=rank,
            world_size=world,
            epoch=epoch,
            batch_size=cfg.train.batch_size,
            batches_per_epoch=cfg.train.batches_per_epoch,
            shuffle_buffer=cfg.data.shuffle_buffer,
            seed=cfg.train.seed,
        )
        objective.train()
        loss_sum, n_batches, skipped, t0 = 0.0, 0, 0, time.perf_counter()
        seen_ids = [] if loop_config.get("record_reads_dir") else None
        for batch in loader:
            pairs = batch["pairs"]
            skipped += batch["skipped"]
            if seen_ids is not None:
                seen_ids.append(batch["ids"][:, 0].clone())
            if cfg.train.augment:
                pairs = fliprot(pairs, augment_rng)
            b, _, p, _ = pairs.shape
            x = plan.prepare_batch(pairs.reshape(b * 2, 1, p, p))  # a0, p0, a1, p1, ...
            if jitter is not None:
                x = jitter(x)
            lr = base_lr * ((1.0 - step / total_steps) if cfg.train.lr_schedule == "linear_to_zero" else 1.0)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with plan.autocast():
                loss = objective(x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            _maybe_fail(loop_config.get("fail_once"), rank=rank, epoch=epoch, step=step)
            optimizer.step()
            step += 1
            loss_sum += loss.item()
            n_batches += 1
        seconds = time.perf_counter() - t0

        pca = None
        eval_model = core
        if rank == 0 and getattr(core, "pca_dim", None):  # the model's own PCA head (HardNet8)
            core.set_pca(*fit_descriptor_pca(core, train_urls[:2], core.pca_dim, plan, method="embed"))
        elif rank == 0 and cfg.model.attached_pca_dim:
            from pipeline.pca import attach_pca

            pca = fit_descriptor_pca(core, train_urls[:2], cfg.model.attached_pca_dim, plan)
            eval_model = attach_pca(core, *pca)
        fpr = evaluate_pairs(eval_model, eval_pairs, eval_labels, plan)[METRIC] if rank == 0 else 0.0
        # One collective: mean train loss over ranks, rank 0's FPR95 to everyone, skipped samples summed.
        shared = torch.tensor([loss_sum / max(1, n_batches), fpr if rank == 0 else 0.0, skipped], dtype=torch.float64)
        if world > 1 and dist.is_available() and dist.is_initialized():
            shared = shared.to(plan.device)
            dist.all_reduce(shared)
            shared = shared.cpu()
            shared[0] /= world
        metrics = {
            "epoch": epoch + 1,
            "step": step,
            "train_loss": float(shared[0]),
            METRIC: float(shared[1]),
            "data/skipped_samples": int(shared[2]),
            "mlflow_run_id": run_id or "",
            "lr": lr,
            "pairs_per_s": n_batches * cfg.train.batch_size * world / seconds if seconds > 0 else math.nan,
        }
        if seen_ids is not None:  # test hook: which pairs this rank read, and on which node
            import json

            record = {"rank": rank, "node": ray.get_runtime_context().get_node_id(), "ids": torch.cat(seen_ids).tolist()}
            (Path(loop_config["record_reads_dir"]) / f"rank{rank}-epoch{epoch}.json").write_text(json.dumps(record))
        if loop_config.get("dump_params_dir"):  # test hook: each rank's weights, to compare across ranks
            torch.save(core.state_dict(), Path(loop_config["dump_params_dir"]) / f"rank{rank}-epoch{epoch}.pt")
        if rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                save_state(Path(tmp), model=core, optimizer=optimizer, epoch=epoch, step=step, mlflow_run_id=run_id,
                           cfg=cfg, pca=pca)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            # Epochs are deterministic (seeded per epoch), so a re-run epoch's figures are the same.
            if epoch + 1 not in logged_epochs:
                logger.metrics(metrics, step=epoch + 1)
        else:
            ray.train.report(metrics, checkpoint=None)


def fit_descriptor_pca(model: torch.nn.Module, urls: list[str], dim: int, plan, method: str = "forward", max_pairs: int = 2048):
    """(components, mean) of a PCA fitted on descriptors of training patches (HardNet8's recipe,
    and the PCA head any embedding model can get with ``model.pca_dim``)."""
    from pipeline.evaluate import describe
    from pipeline.pca import fit_pca

    pairs, _, _ = load_pairs(urls, max_pairs)
    patches = pairs.reshape(-1, *pairs.shape[2:])
    return fit_pca(describe(model, patches, plan, method=method), dim)


def _maybe_fail(spec: dict | None, *, rank: int, epoch: int, step: int) -> None:
    """Fault injection for the fault-tolerance tests: raise once at (rank, step), remembered in a
    marker file so the restarted worker goes on."""
    if spec and rank == spec["rank"] and step == spec["step"] and not Path(spec["marker"]).exists():
        Path(spec["marker"]).write_text(f"failed at epoch {epoch} step {step}")
        raise RuntimeError(f"injected failure on rank {rank} at step {step}")


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
    extra_loop_config: dict[str, Any] | None = None,
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
            **(extra_loop_config or {}),
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
