"""FPR95 on a shard set's eval split by patch contrast (issue 17): all pairs, then only the pairs whose
two patches both have at least a given contrast (std of the intensities in [0, 1]), for SIFT and each
checkpoint given. Why the pair models lead the triplet models on the synthetic split but not on graf:
the split holds DoG keypoints on nearly flat patches (a blurred or smooth image region, contrast of
one or two grey levels), which per-patch standardisation (HardNet, L2-Net, SOSNet, HardNet8) turns
into noise; benchmarks/README.md, zoo section, has the figures.

    .venv/bin/python benchmarks/eval_contrast.py shards-zoo hardnet=RUN_DIR siamese=RUN_DIR

RUN_DIR: a checkpoint folder (with state.pt) or a Ray Train run folder (its last checkpoint is used),
e.g. zoo.py's ``--workdir``/runs/<run>.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def last_checkpoint(path: str) -> str:
    folder = Path(path)
    if (folder / "state.pt").exists():
        return str(folder)
    found = sorted(p for p in folder.glob("checkpoint_*") if (p / "state.pt").exists())
    if not found:
        raise SystemExit(f"{path}: no state.pt in it nor in a checkpoint_* folder under it")
    return str(found[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards", help="shard folder with an eval split")
    parser.add_argument("models", nargs="*", metavar="NAME=RUN_DIR")
    parser.add_argument("--eval-pairs", type=int, default=4000)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.0, 0.005, 0.01, 0.02],
                        help="minimum patch contrast (std of intensities in [0, 1]) of both patches")
    args = parser.parse_args()

    from pipeline.checkpoint import model_from_checkpoint
    from pipeline.data.stream import load_eval_pairs
    from pipeline.evaluate import pair_distances
    from pipeline.metrics import bootstrap_interval, fpr_at_95_recall
    from pipeline.models.sift import SIFT

    pairs, labels = load_eval_pairs(args.shards, args.eval_pairs)[:2]
    contrast = (pairs.reshape(len(pairs), 2, -1).astype(np.float64) / 255.0).std(2).min(1)
    models = {"sift (kornia)": SIFT(pairs.shape[-1])}
    for spec in args.models:
        name, sep, path = spec.partition("=")
        if not sep:
            raise SystemExit(f"{spec!r}: expected NAME=RUN_DIR")
        models[name] = model_from_checkpoint(last_checkpoint(path))[0]
    distances = {name: pair_distances(model.eval(), pairs) for name, model in models.items()}
    for t in args.thresholds:
        keep = contrast >= t
        print(f"both patches' std >= {t:.3f} ({t * 255:.1f} grey levels): {keep.sum()} of {len(keep)} pairs, "
              f"{int(labels[keep].sum())} positives")
        for name, d in distances.items():
            low, high = bootstrap_interval(d[keep], labels[keep], fpr_at_95_recall)
            print(f"  {name:14s} FPR95 {fpr_at_95_recall(d[keep], labels[keep]):.3f} [{low:.3f}, {high:.3f}]")


if __name__ == "__main__":
    main()
