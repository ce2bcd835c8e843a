"""Heads on trained towers, without retraining (benchmarks/README.md, "Learned whitening for the demo's head"):
centring (a full-dimension PCA) against learned whitening at several ridges, paired, on synthetic data.

  whitening.py sequences OUT [SEED]          render the 6 synthetic eval photographs x 8 views in HPatches layout
  whitening.py pairs TRAIN EVAL RUN...       FPR95 on EVAL's eval split (env RIDGES, default 0.2,0.5,1.0)
  whitening.py matching SEQS TRAIN RUN...    MMA@3px on image sequences, kornia SIFT included

TRAIN: shards whose first 2048 train pairs fit the heads (the pipeline's PCA_FIT_PAIRS); RUN: a run folder
(its newest checkpoint's tower; a head saved with it is dropped)."""
import os
import sys
from pathlib import Path

import numpy as np
import torch

from pipeline.checkpoint import model_from_checkpoint
from pipeline.data.shards import shard_paths
from pipeline.data.stream import load_pairs
from pipeline.evaluate import PCA_FIT_PAIRS, PCA_FIT_SHARDS, describe, pair_distances
from pipeline.metrics import fpr_at_95_recall, paired_bootstrap_difference
from pipeline.pca import attach_pca, fit_learned_whitening, fit_pca

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
RIDGES = [float(r) for r in os.environ.get("RIDGES", "0.2,0.5,1.0").split(",")]


def heads(run: str, train: str) -> dict[str, torch.nn.Module]:
    """{"c": centred tower, "lw<ridge>": whitened tower, ...} for the run's newest checkpoint."""
    ck = sorted(p for p in Path(run).rglob("checkpoint_*") if p.is_dir())[-1]
    tower = model_from_checkpoint(str(ck))[0].eval()
    tower = getattr(tower, "backbone", tower).eval()
    pairs, labels, _ = load_pairs(shard_paths(train, "train")[:PCA_FIT_SHARDS], PCA_FIT_PAIRS)
    n, pos = len(pairs), labels == 1
    desc = describe(tower, np.concatenate([pairs[:, 0], pairs[:, 1]])).astype(np.float64)
    out = {"c": attach_pca(tower, *fit_pca(desc, desc.shape[1])).eval()}
    for r in RIDGES:
        out[f"lw{r:g}"] = attach_pca(tower, *fit_learned_whitening(desc, desc[:n][pos], desc[n:][pos], desc.shape[1], r)).eval()
    return out


def sequences(out: Path, seed: int) -> None:
    from PIL import Image

    from pipeline.data.synthetic import render_sequence, source_images

    rng = np.random.default_rng(seed)
    for ref in source_images()["eval"]:
        img1, views, homs = render_sequence(ref, rng)
        d = out / ref.replace(":", "_").rsplit(".", 1)[0]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.rint(img1 * 255).astype(np.uint8)).save(d / "1.png")
        for k, view in views.items():
            Image.fromarray(np.rint(view * 255).astype(np.uint8)).save(d / f"{k}.png")
            np.savetxt(d / f"H_1_{k}", homs[k])
        print(d, img1.shape, flush=True)


def pairs_table(train: str, ev: str, runs: list[str]) -> None:
    pairs, labels, _ = load_pairs(shard_paths(ev, "eval"))
    for run in runs:
        dist = {k: pair_distances(m, pairs) for k, m in heads(run, train).items()}
        line = f"{Path(run).name} {Path(ev).name}: c {fpr_at_95_recall(dist['c'], labels):.4f}"
        for k, d in dist.items():
            if k != "c":
                diff, lo, hi = paired_bootstrap_difference(d, dist["c"], labels, fpr_at_95_recall)
                line += f" | {k} {fpr_at_95_recall(d, labels):.4f} {diff:+.4f} [{lo:+.4f}, {hi:+.4f}]"
        print(line, flush=True)


def matching_table(seqs: str, train: str, runs: list[str]) -> None:
    from pipeline.protocols.matching import evaluate_image_matching

    models = {f"{Path(r).name}+{k}": m for r in runs for k, m in heads(r, train).items()}
    res = evaluate_image_matching(seqs, models, sift=True)
    acc = {n: np.array([p.accuracy([3])[0] for p in ps]) for n, ps in res.pairs.items()}
    idx = np.random.default_rng(0).integers(0, len(next(iter(acc.values()))), (2000, len(next(iter(acc.values())))))
    for n in res.pairs:
        line = f"{n}: MMA@3px {acc[n].mean():.3f}, {res.mean_matches(n):.0f} matches"
        ref = acc.get(n.rsplit("+", 1)[0] + "+c")
        if ref is not None and not n.endswith("+c"):
            d = (acc[n] - ref)[idx].mean(1)  # bootstrap over image pairs
            line += f", vs c {acc[n].mean() - ref.mean():+.3f} [{np.percentile(d, 2.5):+.3f}, {np.percentile(d, 97.5):+.3f}]"
        print(line, flush=True)


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "sequences":
        sequences(Path(args[0]), int(args[1]) if len(args) > 1 else 1234)
    elif cmd == "pairs":
        pairs_table(args[0], args[1], args[2:])
    elif cmd == "matching":
        matching_table(args[0], args[1], args[2:])
    else:
        sys.exit(__doc__)
