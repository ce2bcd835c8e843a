"""Two runs' last checkpoints, paired: FPR95 on a varied eval split and on graf, with the paired bootstrap
interval of the difference (second minus first; pipeline.metrics.paired_bootstrap_difference). usage:
recipes500k.py RUN_A RUN_B, from the folder holding shards-reference and x/cache/graf-<construction>.npz
(README step 13); env EVAL=DIR scores another eval split, GRAF=0 skips graf."""
import os
import sys
from pathlib import Path

import numpy as np

from pipeline.checkpoint import model_from_checkpoint
from pipeline.data.sequences import CONSTRUCTIONS
from pipeline.data.shards import shard_paths
from pipeline.data.stream import load_pairs
from pipeline.evaluate import pair_distances
from pipeline.metrics import fpr_at_95_recall, paired_bootstrap_difference

runs = sys.argv[1:]
models = [model_from_checkpoint(str(sorted(p for p in Path(r).glob("checkpoint_2*") if p.is_dir())[-1]))[0].eval() for r in runs]


def paired(name: str, pairs: np.ndarray, labels: np.ndarray) -> None:
    a, b = (pair_distances(m, pairs) for m in models)
    diff, lo, hi = paired_bootstrap_difference(b, a, labels, fpr_at_95_recall)
    print(f"{name:16} {Path(runs[0]).name} {fpr_at_95_recall(a, labels):.4f}  {Path(runs[1]).name} "
          f"{fpr_at_95_recall(b, labels):.4f}  diff {diff:+.4f} [{lo:+.4f}, {hi:+.4f}]", flush=True)


pairs, labels, _ = load_pairs(shard_paths(os.environ.get("EVAL", "shards-reference"), "eval"))
paired("synthetic varied", pairs, labels)
for c in [] if os.environ.get("GRAF") == "0" else CONSTRUCTIONS:
    z = np.load(f"x/cache/graf-{c}.npz")
    paired(c, z["p"], z["l"])
