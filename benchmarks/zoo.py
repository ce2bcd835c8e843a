"""The architecture zoo (issue 17): every trainable architecture trained through the real pipeline
(``pipeline.workflow.train``: Ray Train, the architecture's own loss and recipe from
``configs/models/<arch>.yaml``) on the same synthetic shards with the same number of training pairs,
then FPR95 with 95 % bootstrap intervals on the synthetic eval split and on Oxford graf, next to
kornia's SIFT, in one table; plus HardNet with the MC-Loss diversity term on (``loss.mc_mu``) against
the plain HardNet row, same budget and seed. Then a table of paired differences: every triplet-loss model
against every pair model and every model against SIFT, each difference in FPR95 with its interval from
bootstrap resamples that score both models on the same pairs (two models' own intervals overlap long
after their difference on the same pairs is clear).

    patchflow shards synthetic --out shards-zoo --train-pairs 120000 --eval-pairs 20000
    .venv/bin/python benchmarks/zoo.py shards-zoo --pairs 98304 --batch-size 128 --eval-pairs 20000   # or: make zoo

Each run trains on ``--pairs`` pairs (``train.batch_size`` from the model file, or ``--batch-size`` for
every run, with the lr scaled by the file's ``lr_reference_batch``; epochs x steps rounded to whole
batches, the actual count printed). ``--parallel`` runs train side by side (default: one per CPU),
each a process of its own joined to this script's Ray cluster, with one Ray worker holding
CPUs / parallel CPUs, longest first: on 2 AVX2 cores two 1-thread HardNet runs made 203 pairs/s
together against 152 for one 2-thread run (benchmarks/side_by_side.py). ``--parallel 1`` trains one
run at a time in this process, its worker holding every CPU. The models evaluated are the last
epoch's checkpoints (no epoch picked by the eval split).
Graf pairs are built as ``patchflow evaluate --images data/oxford_graf`` builds them (seed 0); graf is
only evaluated on, never searched on.

``--grid KEY=V1,V2,...`` (repeatable) instead trains one architecture (``--archs``) once per point of
the grid and prints the synthetic eval FPR95 of each: the search behind the model files' defaults
(graf is not computed in that mode). Every run's config, metrics and checkpoint stay in ``--workdir``
(MLflow store ``mlflow.db``, Ray runs ``runs/``), and every model's per-pair distances in its
``distances.npz``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
GRAF = ROOT / "data" / "oxford_graf"
MODELS_DIR = ROOT / "configs" / "models"
# Issue 17's ordering claim: these triplet-loss models beat those pair-classifier / contrastive ones.
TRIPLET_ARCHS = ("hardnet", "l2net", "sosnet", "hardnet8")
PAIR_ARCHS = ("matchnet", "siamese")


@dataclass
class Row:
    name: str
    arch: str
    loss: str
    pairs: int  # training pairs actually seen
    train_s: float
    synthetic: tuple[float, float, float]  # FPR95, 95 % interval
    graf: tuple[float, float, float] | None
    overrides: dict


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return "unknown CPU"


EXPERIMENT = "patchflow-zoo"


def tracking_uri(workdir: Path) -> str:
    return f"sqlite:///{workdir / 'mlflow.db'}"


def arch_config(arch: str, shards: str, workdir: Path, pairs: int, epochs: int, overrides: dict, eval_pairs: int,
                cpus: int, tag: str = ""):
    """The architecture's model file as ``patchflow train --config`` would load it, with the zoo's data,
    budget, storage and ``cpus`` for its one Ray worker; returns (Config, pairs actually trained on)."""
    from pipeline.config import load_config

    base = yaml.safe_load((MODELS_DIR / f"{arch}.yaml").read_text())
    batch = int(overrides.get("train.batch_size", base["train"]["batch_size"]))
    steps = max(1, round(pairs / (batch * epochs)))
    path = workdir / f"{arch}{tag}.yaml"  # a file per run: runs of one architecture may train side by side
    path.write_text(yaml.safe_dump({
        "base": str(MODELS_DIR / f"{arch}.yaml"),
        "data": {"shards": str(Path(shards).resolve()), "eval_pairs": eval_pairs},
        "scaling": {"num_workers": 1, "cpus_per_worker": cpus, "use_gpu": False},
        "run": {"storage_path": str(workdir / "runs")},
        "mlflow": {"tracking_uri": tracking_uri(workdir), "experiment": EXPERIMENT},
    }))
    updates = {"train.epochs": epochs, "train.batches_per_epoch": steps, **overrides}
    return load_config(path, updates), steps * epochs * batch


def train_and_score(name: str, arch: str, args, workdir: Path, overrides: dict, synth, graf, cpus: int, tag: str = ""
                    ) -> tuple[Row, dict[str, np.ndarray]]:
    """Train one run and score it; the row and the per-pair distances ({"synthetic": ..., "graf": ...})."""
    from pipeline.checkpoint import model_from_checkpoint
    from pipeline.evaluate import pair_distances
    from pipeline.metrics import bootstrap_interval, fpr_at_95_recall
    from pipeline.objectives import loss_name
    from pipeline.workflow import train

    distances: dict[str, np.ndarray] = {}

    def score(model, split, pairs, labels) -> tuple[float, float, float]:
        d = distances[split] = pair_distances(model, pairs)
        return (fpr_at_95_recall(d, labels), *bootstrap_interval(d, labels, fpr_at_95_recall))

    cfg, pairs = arch_config(arch, args.shards, workdir, args.pairs, args.epochs,
                             {"train.seed": args.seed, **({"train.batch_size": args.batch_size} if args.batch_size else {}),
                              **overrides}, args.train_eval_pairs, cpus, tag)
    cfg = cfg.with_updates({"run.name": f"zoo-{name}-{time.strftime('%Y%m%d-%H%M%S')}"})
    t0 = time.perf_counter()
    outcome = train(cfg)
    seconds = time.perf_counter() - t0
    model, _ = model_from_checkpoint(outcome.checkpoint_path)
    row = Row(name, arch, loss_name(arch, cfg.loss), pairs, seconds, score(model, "synthetic", *synth),
              score(model, "graf", *graf) if graf is not None else None, overrides)
    print(f"[zoo] {name}: {pairs} pairs in {seconds:.0f} s, synthetic {row.synthetic[0]:.4f} {row.synthetic[1:]}"
          + (f", graf {row.graf[0]:.4f} {row.graf[1:]}" if row.graf else ""), flush=True)
    return row, distances


def table(rows: list[Row], sift: Row) -> str:
    from pipeline.protocols.common import text_table

    def cell(v):
        return f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]" if v else "-"

    out = [("model", "loss", "pairs", "train s", "synthetic eval FPR95", "graf FPR95", "graf / SIFT", "beats SIFT")]
    for r in [sift, *rows]:
        beats = "-" if r is sift else ("yes" if r.synthetic[2] < sift.synthetic[0] and r.graf and r.graf[2] < sift.graf[0]
                                       else "no")
        ratio = f"{r.graf[0] / sift.graf[0]:.2f}x" if r.graf and sift.graf and sift.graf[0] else "-"
        out.append((r.name, r.loss, str(r.pairs), f"{r.train_s:.0f}", cell(r.synthetic), cell(r.graf), ratio, beats))
    return text_table(out)


def triplet_verdict(rows: list[Row]) -> list[str]:
    """Lines saying whether every triplet-loss model (``TRIPLET_ARCHS``) beats every pair-classifier /
    contrastive one (``PAIR_ARCHS``): the upper end of its interval below the other's point estimate."""
    triplet = [r for r in rows if r.arch in TRIPLET_ARCHS and not r.overrides]
    pair = [r for r in rows if r.arch in PAIR_ARCHS and not r.overrides]
    if not triplet or not pair:  # a run of some architectures only: nothing to compare, not a "yes"
        return ["triplet models vs pair/contrastive ones: not compared (this run lacks one of the two kinds)"]
    lines = []
    for split in ("synthetic", "graf"):
        misses = [f"{t.name} vs {p.name}" for t in triplet for p in pair
                  if getattr(t, split) and getattr(p, split) and not getattr(t, split)[2] < getattr(p, split)[0]]
        lines.append(f"triplet models beat {', '.join(p.name for p in pair)} on {split}: "
                     + ("yes" if not misses else "no (" + "; ".join(misses) + ")"))
    return lines


def paired_table(rows: list[Row], distances: list[dict], sift_distances: dict, labels: dict) -> str:
    """Differences in FPR95 between two models on the same pairs, each with its paired bootstrap interval
    (``pipeline.metrics.paired_bootstrap_difference``): every triplet model against every pair model, and
    every model against SIFT, on each split. "a better" when the whole interval is below 0."""
    from pipeline.metrics import fpr_at_95_recall, paired_bootstrap_difference
    from pipeline.protocols.common import SIFT_NAME, text_table

    plain = [(r, d) for r, d in zip(rows, distances) if not r.overrides]
    comparisons = [(t, p) for t in plain if t[0].arch in TRIPLET_ARCHS for p in plain if p[0].arch in PAIR_ARCHS]
    comparisons += [((r, d), (None, sift_distances)) for r, d in zip(rows, distances)]
    out = [("a", "b", "split", "FPR95 a - b [95 %, paired]", "verdict")]
    for (a, d_a), (b, d_b) in comparisons:
        for split in labels:
            if split not in d_a or split not in d_b:
                continue
            diff, low, high = paired_bootstrap_difference(d_a[split], d_b[split], labels[split], fpr_at_95_recall)
            verdict = "a better" if high < 0 else "b better" if low > 0 else "inside the interval"
            out.append((a.name, b.name if b else SIFT_NAME, split, f"{diff:+.4f} [{low:+.4f}, {high:+.4f}]", verdict))
    return text_table(out)


# Training time relative to HardNet's at the same pairs (the side-by-side zoo's train s on 2 AVX2 cores,
# 2026-12-07): the longest runs start first, so the last to finish is a short one.
RELATIVE_COST = {"hardnet8": 1.4, "matchnet": 0.7, "siamese": 0.2, "tfeat": 0.17}  # every other run: 1


def row_from_json(path: Path) -> Row:
    d = json.loads(path.read_text())
    return Row(**{**d, "synthetic": tuple(d["synthetic"]), "graf": tuple(d["graf"]) if d["graf"] else None})


def run_side_by_side(runs: list[tuple[str, str, dict]], args, workdir: Path, parallel: int, cpus: int
                     ) -> list[tuple[Row, dict[str, np.ndarray]]]:
    """Each run in a process of its own (this script with ``--child-run``) joined to this process's Ray
    cluster, ``parallel`` at a time, longest first; (row, distances) in the order of ``runs``."""
    import ray
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import get_or_create_experiment

    # The store's schema and the experiment made once here: runs starting together would race to create them.
    get_or_create_experiment(MlflowClient(tracking_uri(workdir)), EXPERIMENT)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    queue = sorted(range(len(runs)), key=lambda i: -RELATIVE_COST.get(runs[i][1], 1.0))
    running: dict[int, subprocess.Popen] = {}
    rows: dict[int, tuple[Row, dict[str, np.ndarray]]] = {}
    try:
        while queue or running:
            while queue and len(running) < parallel:
                i = queue.pop(0)
                cmd = [sys.executable, __file__, args.shards, "--pairs", str(args.pairs), "--epochs", str(args.epochs),
                       "--seed", str(args.seed), "--train-eval-pairs", str(args.train_eval_pairs), "--workdir", str(workdir),
                       "--child-run", json.dumps(runs[i]), "--child-cpus", str(cpus), "--child-tag", f"-{i}"]
                running[i] = subprocess.Popen(cmd + (["--batch-size", str(args.batch_size)] if args.batch_size else []), env=env)
            time.sleep(1)
            for i, proc in list(running.items()):
                if proc.poll() is not None:
                    del running[i]
                    if proc.returncode != 0:
                        raise SystemExit(f"[zoo] run {runs[i][0]!r} failed (exit code {proc.returncode}): its output is above")
                    with np.load(workdir / f"distances-{i}.npz") as saved:
                        rows[i] = row_from_json(workdir / f"row-{i}.json"), dict(saved)
    finally:  # a failed run or Ctrl-C: the others stop too
        for proc in running.values():
            proc.terminate()
    return [rows[i] for i in range(len(runs))]


def parse_grid(items: list[str]) -> list[dict]:
    keys, values = [], []
    for item in items:
        key, sep, vals = item.partition("=")
        if not sep:
            raise SystemExit(f"--grid {item!r}: expected KEY=V1,V2,..., e.g. train.lr=0.01,0.1")
        keys.append(key)
        values.append([yaml.safe_load(v) for v in vals.split(",")])
    return [dict(zip(keys, point)) for point in itertools.product(*values)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards", help="shard folder written by `patchflow shards synthetic` (train + eval splits)")
    parser.add_argument("--pairs", type=int, default=122_880, help="training pairs per architecture (the demo's HardNet budget)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs per run (the lr decays to 0 over the run either way)")
    parser.add_argument("--archs", nargs="*", help="default: every trainable registered architecture")
    parser.add_argument("--mc-mu", type=float, default=0.1, help="HardNet + MC-Loss row's loss.mc_mu (0: no such row)")
    parser.add_argument("--batch-size", type=int, help="every run's train.batch_size (default: each model file's; "
                        "the lr follows it through lr_reference_batch)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-pairs", type=int, default=20000, help="synthetic eval pairs in the table (at most the shards' eval split)")
    parser.add_argument("--train-eval-pairs", type=int, default=2000, help="eval pairs of the per-epoch check in training")
    parser.add_argument("--graf-pairs", type=int, help="score a fixed random subset of this many graf pairs (default: all)")
    parser.add_argument("--images", default=str(GRAF), help="sequence with ground-truth homographies (default graf)")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", help="search mode (see above)")
    parser.add_argument("--workdir", help="runs/ and mlflow.db go here (default: a new temporary folder)")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--parallel", type=int, help="runs training side by side, each with CPUs / parallel CPUs "
                        "(default: one per CPU; 1: one at a time in this process)")
    parser.add_argument("--child-run", help=argparse.SUPPRESS)  # [name, arch, overrides]: one run of a --parallel zoo
    parser.add_argument("--child-cpus", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-tag", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_run:
        child_run(args)
        return

    from pipeline.cluster import start_local_ray
    from pipeline.data.stream import load_eval_pairs
    from pipeline.evaluate import pair_distances
    from pipeline.metrics import BOOTSTRAP_RESAMPLES, bootstrap_interval, fpr_at_95_recall
    from pipeline.models import list_models, model_info
    from pipeline.models.sift import SIFT
    from pipeline.protocols.common import SIFT_NAME

    t0 = time.perf_counter()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="patchflow-zoo-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    archs = args.archs or [a for a in list_models() if model_info(a).trainable]
    if args.grid and len(archs) != 1:
        raise SystemExit("--grid searches one architecture: give it with --archs")
    synth = load_eval_pairs(args.shards, args.eval_pairs)[:2]
    graf = None
    if not args.grid:
        from pipeline.data.sequences import sequence_pairs

        graf = sequence_pairs(args.images, seed=0, progress=True)[:2]
        if args.graf_pairs and args.graf_pairs < len(graf[1]):  # a fixed random subset: CPU time, not choice
            keep = np.sort(np.random.default_rng(0).permutation(len(graf[1]))[:args.graf_pairs])
            graf = (graf[0][keep], graf[1][keep])
    print(f"[zoo] {cpu_model()}, {os.cpu_count()} CPUs; {len(synth[1])} synthetic eval pairs from {args.shards}"
          + (f", {len(graf[1])} pairs from {args.images}" if graf else "") + f"; workdir {workdir}", flush=True)

    sift_distances: dict[str, np.ndarray] = {}

    def sift_score(split, pairs, labels):
        d = sift_distances[split] = pair_distances(SIFT(pairs.shape[-1]), pairs)
        return (fpr_at_95_recall(d, labels), *bootstrap_interval(d, labels, fpr_at_95_recall))

    sift = Row(SIFT_NAME, "sift", "-", 0, 0.0, sift_score("synthetic", *synth), sift_score("graf", *graf) if graf else None, {})
    # A Ray of its own, not whichever cluster another process on the machine recorded as current
    # (init_ray would join that one); workflow.train then finds it initialised.
    start_local_ray(os.cpu_count() or 1, log_to_driver=False)
    runs: list[tuple[str, str, dict]]
    if args.grid:
        runs = [(f"{archs[0]} {' '.join(f'{k}={v}' for k, v in p.items())}", archs[0], p) for p in parse_grid(args.grid)]
    else:
        runs = [(a, a, {}) for a in archs]
        if args.mc_mu > 0 and "hardnet" in archs:
            runs.append((f"hardnet + MC-Loss (mu {args.mc_mu:g})", "hardnet", {"loss.mc_mu": args.mc_mu}))
    cpus = os.cpu_count() or 1
    parallel = max(1, min(args.parallel or cpus, len(runs)))
    print(f"[zoo] {len(runs)} runs, {parallel} side by side with {max(1, cpus // parallel)} CPU(s) each", flush=True)
    if parallel == 1:
        scored = [train_and_score(name, arch, args, workdir, over, synth, graf, cpus) for name, arch, over in runs]
    else:
        np.savez(workdir / "eval-pairs.npz", synth_pairs=synth[0], synth_labels=synth[1],  # read by each run's process
                 **({"graf_pairs": graf[0], "graf_labels": graf[1]} if graf else {}))
        scored = run_side_by_side(runs, args, workdir, parallel, max(1, cpus // parallel))
    rows = [row for row, _ in scored]
    # Every run's per-pair distances, for comparisons made afterwards: keys "sift:<split>" and "<i>:<split>",
    # i the row's index in --json's rows.
    np.savez(workdir / "distances.npz", **{f"sift:{k}": d for k, d in sift_distances.items()},
             **{f"{i}:{k}": d for i, (_, dists) in enumerate(scored) for k, d in dists.items()})

    print()
    print(table(rows, sift))
    if not args.grid:
        for line in triplet_verdict(rows):
            print(line)
        print("\nPaired differences (both models scored on each bootstrap resample of the same pairs):")
        print(paired_table(rows, [d for _, d in scored], sift_distances,
                           {"synthetic": synth[1], **({"graf": graf[1]} if graf else {})}))
    else:
        best = min(rows, key=lambda r: r.synthetic[0])
        print(f"best on the synthetic eval split: {best.name} ({best.synthetic[0]:.4f})")
    print(f"\n({args.pairs} pairs asked per run, seed {args.seed}, {args.epochs} epochs; 95 % bootstrap intervals over pairs, "
          f"{BOOTSTRAP_RESAMPLES} resamples; {time.perf_counter() - t0:.0f} s in all)")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_model(), "sift": asdict(sift), "rows": [asdict(r) for r in rows]}, indent=1))


def child_run(args) -> None:
    """One run of a ``--parallel`` zoo, in its own process: train (joining the parent's Ray through
    $RAY_ADDRESS), score on the parent's eval pairs, write the row for the parent."""
    import torch

    name, arch, overrides = json.loads(args.child_run)
    workdir = Path(args.workdir)
    torch.set_num_threads(args.child_cpus)  # the scoring's share of the machine, like the training worker's
    data = np.load(workdir / "eval-pairs.npz")
    synth = (data["synth_pairs"], data["synth_labels"])
    graf = (data["graf_pairs"], data["graf_labels"]) if "graf_pairs" in data else None
    row, distances = train_and_score(name, arch, args, workdir, overrides, synth, graf, args.child_cpus, args.child_tag)
    np.savez(workdir / f"distances{args.child_tag}.npz", **distances)
    (workdir / f"row{args.child_tag}.json").write_text(json.dumps(asdict(row)))  # last: the parent reads both on exit


if __name__ == "__main__":
    main()
