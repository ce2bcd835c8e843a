"""Two runs' last checkpoints, paired: FPR95 on the varied eval split and on graf, with the paired bootstrap
interval of the difference (second minus first). usage: recipes500k.py RUN_A RUN_B, from the folder holding
shards-reference and x/cache/graf-<construction>.npz (see README step 13)."""
import sys
from pathlib import Path
import numpy as np, torch
from pipeline.checkpoint import model_from_checkpoint
from pipeline.data.shards import shard_paths
from pipeline.data.stream import load_pairs
from pipeline.evaluate import pair_distances
from pipeline.metrics import fpr_at_95_recall
from pipeline.data.sequences import CONSTRUCTIONS
runs = sys.argv[1:]
last = [sorted(p for p in Path(r).glob("checkpoint_2*") if p.is_dir())[-1] for r in runs]
models = [model_from_checkpoint(str(c))[0].eval() for c in last]
def paired(name, pairs, labels, rng=np.random.default_rng(0)):
    d = [pair_distances(m, pairs) for m in models]
    f = [fpr_at_95_recall(x, labels) for x in d]
    diffs = []
    for _ in range(1000):
        i = rng.integers(0, len(labels), len(labels))
        diffs.append(fpr_at_95_recall(d[1][i], labels[i]) - fpr_at_95_recall(d[0][i], labels[i]))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    print(f"{name:16} {runs[0].split('/')[-1]} {f[0]:.4f}  {runs[1].split('/')[-1]} {f[1]:.4f}  diff {f[1]-f[0]:+.4f} [{lo:+.4f}, {hi:+.4f}]", flush=True)
import os
p, l, _ = load_pairs(shard_paths(os.environ.get("EVAL", "shards-reference"), "eval"))  # env EVAL: another split
paired("synthetic varied", p, l)
for c in ([] if os.environ.get("GRAF") == "0" else CONSTRUCTIONS):  # env GRAF=0: synthetic only
    z = np.load(f"x/cache/graf-{c}.npz")
    paired(c, z["p"], z["l"])
