"""The ``patchflow`` command.

    patchflow shards synthetic --out shards/
    patchflow train --config configs/train.yaml [--set train.epochs=5]
    patchflow sweep --config configs/sweeps/demo.yaml

Errors are one line on stderr: exit 2 for usage, config and data errors (a bad file, key, shard,
checkpoint or registered model), 1 for runtime failures (MLflow unreachable, a failed training run).
PATCHFLOW_DEBUG=1 shows the traceback of a runtime failure.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


MIX_HELP = ("share the split's pairs among pair constructions, e.g. dog-oriented=2,harris-upright=1,"
            "hessian-rotated-hard=1 (names: <dog|harris|hessian>-<upright|oriented|rotated>[-easy|-hard|-tough|-detected], "
            "hpatches-easy|hard|tough), or a preset (pipeline.data.synthetic.NAMED_MIXES): 'dog' (make demo's) or "
            "'varied' (make reference's); default: all dog-oriented")
CONSTRUCTION_HELP = ("how pairs are cut (pipeline.data.sequences.CONSTRUCTIONS): dog-oriented, dog-upright, harris-upright, "
                     "hessian-upright, hpatches-easy|hard|tough, or <detector>-<orientation>[-<jitter>] (jitter easy|hard|tough, "
                     "or detected: image k's frame is the detector's own re-detection there)")
GATE_HELP = ("re-evaluate champion and challenger on a benchmark instead of the eval split: images:DIR[:METRIC] "
             "(mma@3px default, homography@3px, fpr95@<construction>), phototour:DIR[:fpr95[@<scene>]], "
             "hpatches:DIR[:<verification|matching|retrieval>[@<split>]] (matching@a default); "
             "e.g. --gate images:data/oxford_graf")
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

        from pipeline.data.shards import ShardError
        from pipeline.data.synthetic import parse_mix

        mixes = {}
        for flag, text in (("train_mix", args.train_mix), ("eval_mix", args.eval_mix)):
            try:
                mixes[flag] = parse_mix(text, flag.split("_")[0]) if text else None
            except ValueError as e:  # a usage error: one line, before anything is written
                raise ShardError(f"--{flag.replace('_', '-')}: {e}") from None
        manifest = generate_synthetic(args.out, train_pairs=args.train_pairs, eval_pairs=args.eval_pairs, **mixes,
                                      **common)
    elif args.source == "digits":
        from pipeline.data.digits import digits_to_shards

        manifest = digits_to_shards(args.out, eval_fraction=args.eval_fraction, train_pairs=args.train_pairs,
                                    eval_pairs=args.eval_pairs, **common)
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
                                      pairs_per_sequence=args.pairs_per_sequence, redetect=args.redetect,
                                      construction=args.construction, **common)
    counts = ", ".join(f"{v['pairs']} {k} pairs in {len(v['shards'])} shard(s)" for k, v in manifest["splits"].items())
    print(f"[patchflow] wrote {counts} to {Path(args.out).resolve()} ({time.perf_counter() - t0:.1f} s)")
    return 0


def cmd_evaluate(args) -> int:
    """Every model, kornia's SIFT and OpenCV's baselines on a real benchmark: image sequences (FPR95
    per pair construction + image matching), PhotoTour (m50 FPR95) or HPatches (the benchmark's mAP)."""
    from pipeline import workflow
    from pipeline.config import HPATCHES_SPLITS, ConfigError

    common = dict(models=args.model or [], baselines=args.baselines, experiment=None if args.no_mlflow else args.experiment)
    images_only = {"--construction": args.construction, "--pairs": args.pairs, "--redetect": args.redetect or None,
                   "--max-keypoints": args.max_keypoints, "--no-matching": args.no_matching or None}
    if not args.images:
        given = [flag for flag, value in images_only.items() if value is not None]
        if given:
            raise ConfigError(f"{given[0]}: applies to --images only")
    if args.images:
        if args.split:
            raise ConfigError("--split: applies to --phototour and --hpatches; pick pair constructions with --construction")
        report = workflow.evaluate_on_images(args.images, constructions=args.construction, n_pairs=args.pairs, seed=args.seed,
                                             redetect=args.redetect, max_keypoints=args.max_keypoints or 2000,
                                             matching=not args.no_matching, **common)
    elif args.phototour:
        report = workflow.evaluate_on_phototour(args.phototour, splits=args.split, seed=args.seed, **common)
    else:
        splits = args.split or ["a"]
        if len(splits) > 1 or splits[0] not in HPATCHES_SPLITS:
            raise ConfigError(f"--split: HPatches takes one split of {', '.join(HPATCHES_SPLITS)}, got {', '.join(splits)}")
        report = workflow.evaluate_on_hpatches(args.hpatches, split=splits[0], **common)
    print(f"\n{report.protocol}: {report.data} (sha256 {report.data_sha256[:12]}, {report.params['data_files']} files), "
          f"{report.split}, seed {args.seed}\n")
    print(report.table())
    if report.mlflow_run_id:
        print(f"\nMLflow evaluation run {report.mlflow_run_id} at {report.tracking_uri}")
    print(f"({report.seconds:.0f} s)")
    return 0


def _quiet_libraries(verbose: bool) -> None:
    """Training commands: MLflow's INFO lines (database set-up, model registration) only with --verbose;
    Ray's output is pipeline.cluster.quiet_ray's."""
    if not verbose:
        logging.getLogger("mlflow").setLevel(logging.WARNING)


def cmd_train(args) -> int:
    cfg = _load(args)  # a config error ends here, before the MLflow and Ray imports (~2 s)
    from pipeline.evaluate import METRIC
    from pipeline.workflow import train

    _quiet_libraries(args.verbose)
    out = train(cfg, verbose=args.verbose)
    print(f"[patchflow] run {out.name}: {METRIC}={out.metrics.get(METRIC):.4f} after {out.metrics.get('epoch')} epoch(s)")
    print(f"[patchflow] checkpoint: {out.checkpoint_path}; MLflow run {out.mlflow_run_id} at {out.tracking_uri}")
    if out.pending:
        print(f"[patchflow] warning: MLflow did not take everything; kept in {', '.join(out.pending)}: "
              f"patchflow sync --storage {Path(out.pending[0]).parent.parent} sends it", file=sys.stderr)
    return 0


def cmd_sweep(args) -> int:
    from pipeline.config import load_sweep, parse_overrides

    configs = None if args.resume or args.config is None else load_sweep(args.config, parse_overrides(args.set or []))
    from pipeline.workflow import sweep  # after the config's checks, as in cmd_train

    _quiet_libraries(args.verbose)
    report = sweep(configs, resume_id=args.resume, register=not args.no_register, verbose=args.verbose)
    print("\n" + report.leaderboard)
    print(f"\n(on {report.eval_pairs} eval pairs; sweep {report.sweep_id}; MLflow {report.tracking_uri}, "
          f"parent run {report.parent_run_id}; {report.seconds:.0f} s)")
    return 0


def cmd_promote(args) -> int:
    from pipeline.workflow import promote_registered

    promote_registered(args.model, shards=args.shards, eval_pairs=args.eval_pairs, min_improvement=args.min_improvement,
                       dry_run=args.dry_run, gate=args.gate)  # prints its comparison
    return 0


def cmd_register(args) -> int:
    from pipeline.workflow import register

    reg = register(args.checkpoint, shards=args.shards, model_name=args.name)  # prints the registration
    print(f"[patchflow] next: patchflow promote --model {reg.model_name}")
    return 0


def cmd_sync(args) -> int:
    from pipeline.workflow import sync

    result = sync(args.storage, args.tracking_uri)
    if not (result.sent or result.left or result.skipped):
        print(f"[patchflow] nothing pending under {args.storage}")
    return 1 if result.left else 0


def cmd_export(args) -> int:
    from pipeline.workflow import export_model

    out = export_model(args.model, args.format, args.out)
    print(f"[patchflow] wrote {out.path} ({out.format}); max |exported - module| = {out.max_abs_error:.2e} on a check batch")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="patchflow", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    shards = sub.add_parser("shards", help="write WebDataset shards of patch pairs")
    source = shards.add_subparsers(dest="source", required=True)
    syn = source.add_parser("synthetic", help="pairs from synthetic image sequences: bundled photographs under random viewpoints and light")
    syn.add_argument("--train-pairs", type=int, default=20000)
    syn.add_argument("--eval-pairs", type=int, default=4000)
    syn.add_argument("--train-mix", metavar="NAME=W,...", help=MIX_HELP)
    syn.add_argument("--eval-mix", metavar="NAME=W,...", help=MIX_HELP)
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
    im.add_argument("--construction", default="dog-oriented", help=CONSTRUCTION_HELP)
    dg = source.add_parser("digits", help="pairs of scikit-learn's bundled 8x8 handwritten digits at 32x32 (the Siamese example)")
    dg.add_argument("--train-pairs", type=int, default=20000)
    dg.add_argument("--eval-pairs", type=int, default=2000)
    dg.add_argument("--eval-fraction", type=float, default=0.25, help="share of each digit's images held out for eval")
    for p in (syn, pt, hp, im, dg):
        p.add_argument("--out", required=True, type=Path)
        p.add_argument("--patch-size", type=int, default=32)
        p.add_argument("--pairs-per-block", type=int, default=256)
        p.add_argument("--blocks-per-shard", type=int, default=8)
        p.add_argument("--seed", type=int, default=0)
        p.set_defaults(func=cmd_shards)

    pr = sub.add_parser("promote", help="re-evaluate challenger vs champion on the same eval pairs; move champion if better")
    pr.add_argument("--model", required=True, help="registered model name, e.g. patchflow-hardnet")
    pr.add_argument("--shards", help="shard folder whose eval split decides (default: the challenger's data_shards tag)")
    pr.add_argument("--eval-pairs", type=int, help="cap on eval pairs (with --gate images:...:fpr95@...: pairs per sequence)")
    pr.add_argument("--min-improvement", type=float, default=0.0, help="required gain in the gate's metric (absolute)")
    pr.add_argument("--dry-run", action="store_true", help="print the comparison, change nothing")
    pr.add_argument("--gate", metavar="KIND:DIR[:METRIC]", help=GATE_HELP)
    pr.set_defaults(func=cmd_promote)

    rg = sub.add_parser("register", help="register a training checkpoint's model (tensors + model card) as the challenger")
    rg.add_argument("--checkpoint", required=True, type=Path, help="a checkpoint folder (holding state.pt)")
    rg.add_argument("--shards", help="shard folder whose eval split scores it (default: the checkpoint's data.shards)")
    rg.add_argument("--name", help="registered model name (default: the checkpoint config's mlflow.registered_model)")
    rg.set_defaults(func=cmd_register)

    sy = sub.add_parser("sync", help="send to MLflow what runs could not send during an outage (their pending files)")
    sy.add_argument("--storage", default="runs", help="run.storage_path of the runs (default: runs)")
    sy.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db")
    sy.set_defaults(func=cmd_sync)

    ex = sub.add_parser("export", help="write a standalone descriptor file (TorchScript or ONNX)")
    ex.add_argument("--model", required=True, help="models:/patchflow-hardnet@champion, runs:/..., or a checkpoint folder")
    ex.add_argument("--format", choices=["torchscript", "onnx"], required=True)
    ex.add_argument("--out", required=True, type=Path)
    ex.set_defaults(func=cmd_export)

    ev = sub.add_parser("evaluate", help="models, SIFT and OpenCV's baselines on a real benchmark: image sequences, PhotoTour or HPatches")
    data = ev.add_mutually_exclusive_group(required=True)
    data.add_argument("--images", type=Path, help="sequence folder (img1..6 + H1toKp, or 1..6.ppm + H_1_k) or a folder of them: "
                                                  "FPR95 per pair construction, then image matching (MMA, homography accuracy)")
    data.add_argument("--phototour", type=Path, help="UBC PhotoTour scene folder(s) (liberty/, notredame/, yosemite/ or .pt): "
                                                     "FPR95 on the m50 pairs, the HardNet paper's table")
    data.add_argument("--hpatches", type=Path, help="hpatches-release folder: verification, matching and retrieval mAP")
    ev.add_argument("--model", action="append", help="models:/patchflow-hardnet@champion, runs:/..., a checkpoint folder "
                                                     "or a baseline's name; repeatable")
    ev.add_argument("--split", action="append", help="PhotoTour: a scene to test on (repeatable; default all found); "
                                                     "HPatches: a|b|c|full|illum|view (default a)")
    ev.add_argument("--construction", action="append", help="--images, repeatable (default: every named one): " + CONSTRUCTION_HELP)
    ev.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=None,
                    help="OpenCV's SIFT, VGG, BoostDesc and TEBLID rows (default: when the [baselines] extra is installed)")
    ev.add_argument("--pairs", type=int, help="--images: pairs per sequence and construction (default: all correspondences)")
    ev.add_argument("--max-keypoints", type=int, help="--images: keypoints per image (default 2000)")
    ev.add_argument("--no-matching", action="store_true", help="--images: skip the image-matching table")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--redetect", action="store_true", help=REDETECT_HELP)
    ev.add_argument("--experiment", default="patchflow-evaluation")
    ev.add_argument("--no-mlflow", action="store_true")
    ev.set_defaults(func=cmd_evaluate)

    for name, func, text in (("train", cmd_train, "train one model with Ray Train"), ("sweep", cmd_sweep, "Ray Tune sweep, then register the best model")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--config", required=name == "train", type=Path)
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. train.epochs=5")
        p.add_argument("--verbose", action="store_true",
                       help="also show Ray's own output (workers' logs, Tune's status table); otherwise it stays in Ray's log files")
        if name == "sweep":
            p.add_argument("--no-register", action="store_true", help="skip registration / champion gating")
            p.add_argument("--resume", metavar="SWEEP_ID", help="continue an interrupted sweep (found in $MLFLOW_TRACKING_URI or ./mlflow.db): finished trials are kept")
        p.set_defaults(func=func)

    from pipeline.submit import add_parsers  # `patchflow submit` / `patchflow jobs`: Ray Jobs on a cluster

    add_parsers(sub)
    return parser


# The errors that mean "the input is wrong" (exit 2), by module: looked up only in modules the command
# imported, since an error cannot come from one it did not (importing them all up front cost every
# command ~2 s of MLflow and torch imports, --help included).
INPUT_ERRORS = (("pipeline.config", "ConfigError"), ("pipeline.data.shards", "ShardError"),
                ("pipeline.data.stream", "StreamError"), ("pipeline.checkpoint", "CheckpointError"),
                ("pipeline.registry", "RegistryError"))


def _is_input_error(e: BaseException) -> bool:
    return any(isinstance(e, cls) for module, name in INPUT_ERRORS
               if (cls := getattr(sys.modules.get(module), name, None)) is not None)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as e:
        if _is_input_error(e):  # the input is wrong
            print(f"patchflow: error: {e}", file=sys.stderr)
            return 2
        # a runtime failure: one line, the traceback on request
        if os.environ.get("PATCHFLOW_DEBUG"):
            raise
        print(f"patchflow: error: {_runtime_message(e)} (PATCHFLOW_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1


def _runtime_message(e: BaseException) -> str:
    """Its first line, and that of its root cause (a failed training run wraps the worker's error)."""
    from pipeline.tracking import TrackingError, first_line

    root = e
    while root.__cause__ is not None:
        root = root.__cause__
    if isinstance(e, TrackingError) or root is e:
        return first_line(e)
    return f"{first_line(e)} ({first_line(root)})"


if __name__ == "__main__":
    sys.exit(main())
