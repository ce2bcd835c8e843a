"""Graf FPR95 per construction of in-budget A/B runs (each run's last checkpoint as saved), B paired against A.
usage: abgraf.py A1 B1 A2 B2 ...   (graf pairs: evalq.py's cache, env CACHE)"""
import sys
from pathlib import Path
import numpy as np, torch
torch.set_num_threads(2)
from pipeline.checkpoint import model_from_checkpoint
from pipeline.evaluate import pair_distances
from pipeline.metrics import fpr_at_95_recall, paired_bootstrap_difference
from pipeline.data.sequences import CONSTRUCTIONS
import os
CACHE = os.environ.get("CACHE", ".cache/issue13")  # evalq.py's graf pairs
runs = sys.argv[1:]
for a, b in zip(runs[::2], runs[1::2]):
    ms = {r: model_from_checkpoint(str(sorted(p for p in Path(r).glob("checkpoint_2*") if p.is_dir())[-1]))[0].eval() for r in (a, b)}
    line = f"{Path(a).name}->{Path(b).name}"
    for con in CONSTRUCTIONS:
        z = np.load(f"{CACHE}/graf-{con}.npz")
        da, db = (pair_distances(ms[r], z["p"]) for r in (a, b))
        diff, lo, hi = paired_bootstrap_difference(db, da, z["l"], fpr_at_95_recall)
        line += f" | {con} {fpr_at_95_recall(da, z['l']):.3f}->{fpr_at_95_recall(db, z['l']):.3f} {diff:+.3f} [{lo:+.3f},{hi:+.3f}]"
    print(line, flush=True)
