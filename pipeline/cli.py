"""The ``patchflow`` command.

    patchflow shards synthetic --out shards/
    patchflow train --config configs/train.yaml [--set train.epochs=5]
    patchflow sweep --config configs/sweeps/demo.yaml
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def _load(args) -> "Config":  # noqa: F821
    from pipeline.config import load_config, parse_overrides

    return load_config(args.config, parse_overrides(args.set or []))


def cmd_shards(args) -> int:
    from pipeline.data.synthetic import generate_synthetic

    t0 = time.perf_counter()
    manifest = generate_synthetic(
        args.out,
        train_pairs=args.train_pairs,
        eval_pairs=args.eval_pairs,
        patch_size=args.patch_size,
        pairs_per_block=args.pairs_per_block,
        blocks_per_shard=args.blocks_per_shard,
        seed=args.seed,
    )
    splits = manifest["splits"]
    print(
        f"[patchflow] wrote {splits['train']['pairs']} train / {splits['eval']['pairs']} eval pairs in "
        f"{len(splits['train']['shards'])} + {len(splits['eval']['shards'])} shards to {Path(args.out).resolve()} "
        f"({time.perf_counter() - t0:.1f} s)"
    )
    return 0


def cmd_train(args) -> int:
    from mlflow.tracking import MlflowClient

    from pipeline.cluster import init_ray
    from pipeline.tracking import RunLogger, get_or_create_experiment, resolve_tracking_uri
    from pipeline.train import METRIC, build_trainer, preflight

    cfg = _load(args)
    shard_urls = preflight(cfg)
    name = cfg.run.name or f"train-{time.strftime('%Y%m%d-%H%M%S')}"
    uri = resolve_tracking_uri(cfg.mlflow.tracking_uri)
    client = MlflowClient(uri)
    experiment_id = get_or_create_experiment(client, cfg.mlflow.experiment)
    # Re-running with the same name resumes the Ray Train run: log into the same MLflow run.
    existing = client.search_runs([experiment_id], filter_string=f"tags.`patchflow.run_name` = '{name}'", max_results=1)
    run_id = existing[0].info.run_id if existing else client.create_run(
        experiment_id, run_name=name, tags={"patchflow.run_name": name, "patchflow.kind": "train"}
    ).info.run_id
    if not existing:
        RunLogger(uri, run_id).params(cfg.model_dump(mode="json"))
    init_ray()
    trainer = build_trainer(cfg, name=name, tracking_uri=uri, mlflow_run_id=run_id, shard_urls=shard_urls)
    try:
        result = trainer.fit()
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    print(f"[patchflow] run {name}: {METRIC}={result.metrics.get(METRIC):.4f} after {result.metrics.get('epoch')} epoch(s)")
    print(f"[patchflow] checkpoint: {result.checkpoint.path if result.checkpoint else None}; MLflow run {run_id} at {uri}")
    return 0


def cmd_sweep(args) -> int:
    from pipeline.data.shards import shard_paths
    from pipeline.data.stream import load_pairs
    from pipeline.evaluate import SiftBaseline, evaluate_pairs
    from pipeline.registry import register_checkpoint
    from pipeline.tracking import resolve_tracking_uri
    from pipeline.tune import run_sweep

    t0 = time.perf_counter()
    cfg = _load(args)
    if cfg.sweep is None:
        from pipeline.config import ConfigError

        raise ConfigError(f"{args.config}: sweep: required section is missing (search_space, num_samples, ...)")
    result = run_sweep(cfg)
    best = result.best
    print(f"[patchflow] best trial {best.trial_id} {best.params}: eval FPR95 {best.best_fpr95:.4f}")
    if args.no_register:
        return 0
    pairs, labels, _ = load_pairs(shard_paths(cfg.data.shards, "eval"), cfg.data.eval_pairs)
    reg = register_checkpoint(cfg, best.checkpoint_path, best.mlflow_run_id, sweep_id=result.sweep_id, eval_pairs=(pairs, labels))
    sift = evaluate_pairs(SiftBaseline(pairs.shape[-1]), pairs, labels)["eval_fpr95"]
    rows = [
        ("architecture", "eval FPR95", "SIFT FPR95", "MLflow run id", "model version", "alias"),
        (cfg.model.arch, f"{reg.fpr95:.4f}", f"{sift:.4f}", reg.run_id, f"{reg.model_name} v{reg.version}",
         "champion" if reg.promoted else f"challenger (champion: v{reg.champion_version})"),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print()
    for i, row in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print(f"\n(on {len(labels)} eval pairs; sweep {result.sweep_id}; MLflow {resolve_tracking_uri(cfg.mlflow.tracking_uri)}; "
          f"{time.perf_counter() - t0:.0f} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="patchflow", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    shards = sub.add_parser("shards", help="write WebDataset shards of patch pairs")
    source = shards.add_subparsers(dest="source", required=True)
    syn = source.add_parser("synthetic", help="pairs from scikit-image's bundled photos under random homographies")
    syn.add_argument("--out", required=True, type=Path)
    syn.add_argument("--train-pairs", type=int, default=20000)
    syn.add_argument("--eval-pairs", type=int, default=4000)
    syn.add_argument("--patch-size", type=int, default=32)
    syn.add_argument("--pairs-per-block", type=int, default=256)
    syn.add_argument("--blocks-per-shard", type=int, default=8)
    syn.add_argument("--seed", type=int, default=0)
    syn.set_defaults(func=cmd_shards)

    for name, func, text in (("train", cmd_train, "train one model with Ray Train"), ("sweep", cmd_sweep, "Ray Tune sweep, then register the best model")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--config", required=True, type=Path)
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. train.epochs=5")
        if name == "sweep":
            p.add_argument("--no-register", action="store_true", help="skip registration / champion gating")
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    from pipeline.config import ConfigError
    from pipeline.data.shards import ShardError
    from pipeline.data.stream import StreamError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ShardError, StreamError) as e:
        print(f"patchflow: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
