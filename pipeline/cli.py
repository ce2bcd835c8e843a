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


REDETECT_HELP = "positives only where the detector finds the point again in image k (PhotoTour's criterion; easier pairs)"


def _load(args):
    from pipeline.config import load_config, parse_overrides

    return load_config(args.config, parse_overrides(args.set or []))


def cmd_shards(args) -> int:
    common = dict(patch_size=args.patch_size, pairs_per_block=args.pairs_per_block,
                  blocks_per_shard=args.blocks_per_shard, seed=args.seed)
    t0 = time.perf_counter()
    if args.source == "synthetic":
        from pipeline.data.synthetic import generate_synthetic

        manifest = generate_synthetic(args.out, train_pairs=args.train_pairs, eval_pairs=args.eval_pairs, **common)
    elif args.source == "phototour":
        from pipeline.data.phototour import phototour_to_shards

        manifest = phototour_to_shards(args.root, args.out, split=args.split, train_pairs=args.train_pairs,
                                       match_file=args.match_file, eval_root=args.eval_root, **common)
    elif args.source == "hpatches":
        from pipeline.data.hpatches import hpatches_to_shards

        manifest = hpatches_to_shards(args.root, args.out, split=args.split, split_name=args.split_name,
                                      difficulties=args.difficulties, train_pairs=args.train_pairs,
                                      eval_pairs=args.eval_pairs, splits_json=args.splits_json, **common)
    else:
        from pipeline.data.sequences import sequence_to_shards

        manifest = sequence_to_shards(args.roots, args.out, split=args.split, eval_dirs=args.eval_dirs,
                                      pairs_per_sequence=args.pairs_per_sequence, redetect=args.redetect, **common)
    counts = ", ".join(f"{v['pairs']} {k} pairs in {len(v['shards'])} shard(s)" for k, v in manifest["splits"].items())
    print(f"[patchflow] wrote {counts} to {Path(args.out).resolve()} ({time.perf_counter() - t0:.1f} s)")
    return 0


def _load_model(spec: str):
    """An MLflow model URI (models:/name@alias, runs:/...) or a training checkpoint folder."""
    if Path(spec).is_dir():
        from pipeline.train import model_from_checkpoint

        return model_from_checkpoint(spec)[0]
    from pipeline.registry import load_descriptor

    return load_descriptor(spec)


def cmd_evaluate(args) -> int:
    """FPR95 and AP of each model and of kornia's SIFT on real pairs from an image sequence."""
    from mlflow.tracking import MlflowClient

    from pipeline.data.sequences import sequence_pairs
    from pipeline.evaluate import SiftBaseline, pair_distances
    from pipeline.metrics import average_precision, bootstrap_interval, fpr_at_95_recall
    from pipeline.tracking import RunLogger, get_or_create_experiment, resolve_tracking_uri

    t0 = time.perf_counter()
    pairs, labels, _ = sequence_pairs(args.images, n_pairs=args.pairs, seed=args.seed, redetect=args.redetect,
                                      progress=True)
    models = {"sift (kornia)": SiftBaseline(pairs.shape[-1])}
    for spec in args.model or []:
        models[spec] = _load_model(spec)
    rows = [("model", "FPR95", "95% interval", "AP")]
    results = {}
    for name, model in models.items():
        d = pair_distances(model, pairs)
        fpr, ap = fpr_at_95_recall(d, labels), average_precision(d, labels)
        lo, hi = bootstrap_interval(d, labels, fpr_at_95_recall, seed=args.seed)
        results[name] = {"fpr95": fpr, "fpr95_low": lo, "fpr95_high": hi, "ap": ap}
        rows.append((name, f"{fpr:.4f}", f"[{lo:.4f}, {hi:.4f}]", f"{ap:.4f}"))
    print(f"\n{len(labels)} pairs ({int(labels.sum())} positive) from {args.images}, seed {args.seed}\n")
    print(_table(rows))
    if not args.no_mlflow:
        uri = resolve_tracking_uri(None)
        client = MlflowClient(uri)
        run = client.create_run(get_or_create_experiment(client, args.experiment),
                                run_name=f"evaluate-{Path(args.images).name}", tags={"patchflow.kind": "evaluation"})
        logger = RunLogger(uri, run.info.run_id)
        logger.params({"images": str(Path(args.images).resolve()), "pairs": len(labels), "seed": args.seed,
                       "redetect": args.redetect,
                       "models": ",".join(models)})
        for i, (name, values) in enumerate(results.items()):
            key = "sift" if name.startswith("sift") else f"model{i}"
            logger.metrics({f"{key}/{k}": v for k, v in values.items()}, step=0)
            logger.tags({f"{key}.name": name})
        client.set_terminated(run.info.run_id, "FINISHED")
        print(f"\nMLflow evaluation run {run.info.run_id} at {uri}")
    print(f"({time.perf_counter() - t0:.0f} s)")
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


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _log_plots(client, run_id: str, distances: dict, labels) -> None:
    """ROC curves of every architecture's registered model and SIFT on the same pairs, and each
    one's distance histogram, as artifacts of the sweep's parent run."""
    import tempfile

    from pipeline.plots import distance_histogram, roc_figure, save_figure

    with tempfile.TemporaryDirectory() as tmp:
        save_figure(roc_figure({k: (d, labels) for k, d in distances.items()}), Path(tmp) / "roc.png")
        for name, d in distances.items():
            save_figure(distance_histogram(d, labels, f"{name}: pair distances"), Path(tmp) / f"distances_{name}.png")
        client.log_artifacts(run_id, tmp, "plots")


def _with_best_pca(cfg, best, pairs, labels, client, parent_id: str):
    """With ``sweep.pca_dims``: try a PCA head of each dimension on the best tower (fitted on its
    training descriptors, no retraining), log the curve, and return the tower with the best head
    when it beats no PCA; None keeps the checkpoint's model as it is."""
    import tempfile

    from pipeline.data.shards import shard_paths
    from pipeline.data.stream import load_pairs
    from pipeline.evaluate import pca_dimension_curve
    from pipeline.pca import attach_pca
    from pipeline.plots import pca_curve, save_figure
    from pipeline.train import model_from_checkpoint

    model, trained_cfg = model_from_checkpoint(best.checkpoint_path)
    if not cfg.sweep.pca_dims or getattr(model, "kind", "embedding") != "embedding" or hasattr(model, "pca") or getattr(model, "pca_dim", None):
        return None
    train, _, _ = load_pairs(shard_paths(cfg.data.shards, "train")[:2], 2048)
    curve = pca_dimension_curve(model, train.reshape(-1, *train.shape[2:]), pairs, labels, cfg.sweep.pca_dims)
    arch = cfg.model.arch
    for dim, fpr, _ in curve:
        client.log_metric(parent_id, f"{arch}/pca_fpr95", fpr, step=dim)
    with tempfile.TemporaryDirectory() as tmp:
        path = save_figure(pca_curve([d for d, _, _ in curve], [f for _, f, _ in curve], best.best_fpr95), Path(tmp) / f"pca_{arch}.png")
        client.log_artifact(parent_id, str(path), "plots")
    dim, fpr, (components, mean) = min(curve, key=lambda c: c[1])
    print(f"[patchflow] {arch}: PCA curve " + ", ".join(f"{d}:{f:.4f}" for d, f, _ in curve)
          + f" (no PCA: {best.best_fpr95:.4f})")
    return attach_pca(model, components, mean) if fpr < best.best_fpr95 else None


def cmd_sweep(args) -> int:
    from mlflow.tracking import MlflowClient

    from pipeline.config import ConfigError, load_sweep, parse_overrides
    from pipeline.data.stream import load_eval_split
    from pipeline.evaluate import SiftBaseline, pair_distances
    from pipeline.metrics import average_precision, fpr_at_95_recall
    from pipeline.registry import promote, register_checkpoint
    from pipeline.tracking import resolve_tracking_uri
    from pipeline.train import preflight
    from pipeline.tune import effect_of, find_sweep, new_sweep_id, run_sweep, start_parent_run

    t0 = time.perf_counter()
    if args.resume:
        sweep_id = args.resume
        parent_id, configs = find_sweep(sweep_id)
        client = MlflowClient(resolve_tracking_uri(configs[0].mlflow.tracking_uri))
        # runs a killed driver left RUNNING: say so; resumed trials reopen their own run
        for run in client.search_runs([client.get_run(parent_id).info.experiment_id],
                                      f"tags.`mlflow.parentRunId` = '{parent_id}' and attributes.status = 'RUNNING'"):
            client.set_tag(run.info.run_id, "patchflow.interrupted", "driver stopped; resumed")
            client.set_terminated(run.info.run_id, "KILLED")
        client.update_run(parent_id, status="RUNNING")
        print(f"[patchflow] resuming sweep {sweep_id} (MLflow parent run {parent_id})", flush=True)
    elif args.config is None:
        raise ConfigError("patchflow sweep: give --config FILE, or --resume SWEEP_ID")
    else:
        configs = load_sweep(args.config, parse_overrides(args.set or []))
        if configs[0].sweep is None:
            raise ConfigError(f"{args.config}: sweep: required section is missing (search_space, num_samples, ...)")
    # every architecture's data problems surface before the first trial starts; checksums once each
    verified = [preflight(cfg) for cfg in configs]
    first = configs[0]
    if not args.resume:
        sweep_id = new_sweep_id()
        parent_id = start_parent_run(first, sweep_id, configs)
    pairs, labels, _ = load_eval_split(first.data, verified[0]["eval"])
    rows = [("architecture", "best config", "eval FPR95", "eval AP", "MLflow run id", "model version", "alias")]
    curves = {}
    client = MlflowClient(resolve_tracking_uri(first.mlflow.tracking_uri))
    for cfg, shard_urls in zip(configs, verified):
        result = run_sweep(cfg, sweep_id=sweep_id, parent_run_id=parent_id, resume=bool(args.resume), shard_urls=shard_urls)
        best = result.best
        params = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in best.params.items()) or "defaults"
        print(f"[patchflow] {cfg.model.arch}: best trial {best.trial_id} ({params}): eval FPR95 {best.best_fpr95:.4f}")
        if "loss.mc_mu" in cfg.sweep.search_space:
            effect = [("MC-Loss mu", "best eval FPR95", "trials")]
            effect += [(f"{mu:g}" + (" (off)" if mu == 0 else ""), f"{fpr:.4f}", str(n)) for mu, fpr, n in effect_of(result.trials, "loss.mc_mu")]
            print(f"\n{cfg.model.arch}: effect of the MC-Loss diversity term\n{_table(effect)}\n")
        if args.no_register:
            rows.append((cfg.model.arch, params, f"{best.best_fpr95:.4f}", "-", best.mlflow_run_id or "", "-", "-"))
            continue
        model = _with_best_pca(cfg, best, pairs, labels, client, parent_id)
        reg = register_checkpoint(cfg, best.checkpoint_path, best.mlflow_run_id, sweep_id=sweep_id,
                                  eval_pairs=(pairs, labels), model=model)
        promo = promote(reg.model_name, pairs, labels, tracking_uri=cfg.mlflow.tracking_uri, challenger_fpr95=reg.fpr95)
        curves[cfg.model.arch] = reg.distances
        alias = "champion" if promo.promoted else f"challenger (champion: v{promo.current_champion})"
        ap = average_precision(reg.distances, labels)
        client.log_metric(parent_id, f"{cfg.model.arch}/eval_ap", ap)
        rows.append((cfg.model.arch, params, f"{reg.fpr95:.4f}", f"{ap:.4f}", reg.run_id, f"{reg.model_name} v{reg.version}", alias))
    sift_distances = pair_distances(SiftBaseline(pairs.shape[-1]), pairs)
    sift = fpr_at_95_recall(sift_distances, labels)
    rows.append(("sift (kornia)", "untrained baseline", f"{sift:.4f}", f"{average_precision(sift_distances, labels):.4f}", "-", "-", "-"))
    table = _table(rows)
    print("\n" + table)
    uri = resolve_tracking_uri(first.mlflow.tracking_uri)
    if curves:
        _log_plots(client, parent_id, {**curves, "sift": sift_distances}, labels)
    client.log_text(parent_id, table + "\n", "leaderboard.txt")
    client.log_metric(parent_id, "sift/eval_fpr95", sift)
    client.set_terminated(parent_id, "FINISHED")
    print(f"\n(on {len(labels)} eval pairs; sweep {sweep_id}; MLflow {uri}, parent run {parent_id}; "
          f"{time.perf_counter() - t0:.0f} s)")
    return 0


def cmd_promote(args) -> int:
    from mlflow.tracking import MlflowClient

    from pipeline.data.stream import load_eval_pairs
    from pipeline.registry import CHALLENGER, promote
    from pipeline.tracking import resolve_tracking_uri

    shards = args.shards
    if shards is None:  # the eval shards the challenger was registered against
        version = MlflowClient(resolve_tracking_uri(None)).get_model_version_by_alias(args.model, CHALLENGER)
        shards = version.tags.get("data_shards")
        if not shards:
            raise SystemExit(f"patchflow: error: {args.model} v{version.version} has no data_shards tag; pass --shards DIR")
    pairs, labels, _ = load_eval_pairs(shards, args.eval_pairs)  # checksums verified, a short set refused
    promote(args.model, pairs, labels, min_improvement=args.min_improvement, dry_run=args.dry_run)
    return 0


def cmd_export(args) -> int:
    from pipeline.export import export_descriptor, load_exported

    model = _load_model(args.model)
    out = export_descriptor(model, args.format, args.out)
    # the file must reproduce the module before we call it done
    import numpy as np
    import torch

    x = np.random.default_rng(0).random((3, 1, model.input_size, model.input_size), dtype=np.float32)
    with torch.no_grad():
        expected = model.eval()(torch.from_numpy(x)).numpy()
    err = float(np.abs(load_exported(out)(x) - expected).max())
    print(f"[patchflow] wrote {out} ({args.format}); max |exported - module| = {err:.2e} on a check batch")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="patchflow", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    shards = sub.add_parser("shards", help="write WebDataset shards of patch pairs")
    source = shards.add_subparsers(dest="source", required=True)
    syn = source.add_parser("synthetic", help="pairs from synthetic image sequences: bundled photographs under random viewpoints and light")
    syn.add_argument("--train-pairs", type=int, default=20000)
    syn.add_argument("--eval-pairs", type=int, default=4000)
    pt = source.add_parser("phototour", help="UBC PhotoTour: a folder of patchesNNNN.bmp + info.txt + m50 files, or torchvision's .pt")
    pt.add_argument("root", type=Path)
    pt.add_argument("--split", choices=["train", "eval", "both"], default="both")
    pt.add_argument("--train-pairs", type=int, default=500_000)
    pt.add_argument("--match-file", help="m50_*.txt naming the eval pairs (default: m50_100000_100000_0.txt)")
    pt.add_argument("--eval-root", type=Path, help="take eval pairs from another scene (e.g. train liberty, eval notredame)")
    hp = source.add_parser("hpatches", help="HPatches release: hpatches-release/<seq>/{ref,e*,h*,t*}.png")
    hp.add_argument("root", type=Path)
    hp.add_argument("--split", choices=["train", "eval", "both"], default="both")
    hp.add_argument("--split-name", choices=["a", "b", "c", "illum", "view", "full"], default="a")
    hp.add_argument("--difficulties", default="eht")
    hp.add_argument("--train-pairs", type=int)
    hp.add_argument("--eval-pairs", type=int)
    hp.add_argument("--splits-json", type=Path)
    im = source.add_parser("images", help="image sequences with homographies (HPatches 1..6.ppm + H_1_k, Oxford img1..6 + H1toKp)")
    im.add_argument("roots", type=Path, nargs="+")
    im.add_argument("--split", choices=["train", "eval", "both"], default="eval")
    im.add_argument("--eval-dirs", type=Path, nargs="*")
    im.add_argument("--pairs-per-sequence", type=int)
    im.add_argument("--redetect", action="store_true", help=REDETECT_HELP)
    for p in (syn, pt, hp, im):
        p.add_argument("--out", required=True, type=Path)
        p.add_argument("--patch-size", type=int, default=32)
        p.add_argument("--pairs-per-block", type=int, default=256)
        p.add_argument("--blocks-per-shard", type=int, default=8)
        p.add_argument("--seed", type=int, default=0)
        p.set_defaults(func=cmd_shards)

    pr = sub.add_parser("promote", help="re-evaluate challenger vs champion on the same eval pairs; move champion if better")
    pr.add_argument("--model", required=True, help="registered model name, e.g. patchflow-hardnet")
    pr.add_argument("--shards", help="shard folder whose eval split decides (default: the challenger's data_shards tag)")
    pr.add_argument("--eval-pairs", type=int, help="cap on eval pairs")
    pr.add_argument("--min-improvement", type=float, default=0.0, help="required FPR95 reduction (absolute)")
    pr.add_argument("--dry-run", action="store_true", help="print the comparison, change nothing")
    pr.set_defaults(func=cmd_promote)

    ex = sub.add_parser("export", help="write a standalone descriptor file (TorchScript or ONNX)")
    ex.add_argument("--model", required=True, help="models:/patchflow-hardnet@champion, runs:/..., or a checkpoint folder")
    ex.add_argument("--format", choices=["torchscript", "onnx"], required=True)
    ex.add_argument("--out", required=True, type=Path)
    ex.set_defaults(func=cmd_export)

    ev = sub.add_parser("evaluate", help="FPR95 / AP of models and SIFT on real pairs from an image sequence")
    ev.add_argument("--images", required=True, type=Path, help="sequence folder: img1..6 + H1toKp, or 1..6.ppm + H_1_k")
    ev.add_argument("--model", action="append", help="models:/patchflow-hardnet@champion, runs:/..., or a checkpoint folder")
    ev.add_argument("--pairs", type=int, help="pairs per sequence (default: all detected)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--redetect", action="store_true", help=REDETECT_HELP)
    ev.add_argument("--experiment", default="patchflow-evaluation")
    ev.add_argument("--no-mlflow", action="store_true")
    ev.set_defaults(func=cmd_evaluate)

    for name, func, text in (("train", cmd_train, "train one model with Ray Train"), ("sweep", cmd_sweep, "Ray Tune sweep, then register the best model")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--config", required=name == "train", type=Path)
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. train.epochs=5")
        if name == "sweep":
            p.add_argument("--no-register", action="store_true", help="skip registration / champion gating")
            p.add_argument("--resume", metavar="SWEEP_ID", help="continue an interrupted sweep (found in $MLFLOW_TRACKING_URI or ./mlflow.db): finished trials are kept")
        p.set_defaults(func=func)

    from pipeline.submit import add_parsers  # `patchflow submit` / `patchflow jobs`: Ray Jobs on a cluster

    add_parsers(sub)
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
