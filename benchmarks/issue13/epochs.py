"""Each checkpoint of a run, as saved (head included): FPR95 on the run's eval split (all, and the first 2000 pairs)
and per graf construction. usage: epochs.py SHARDS RUN_DIR   (graf pairs: evalq.py's cache, env CACHE)"""
import sys
from pathlib import Path
import numpy as np, torch
torch.set_num_threads(1)
from pipeline.checkpoint import model_from_checkpoint
from pipeline.data.shards import shard_paths
from pipeline.data.stream import load_pairs
from pipeline.evaluate import pair_distances
from pipeline.metrics import fpr_at_95_recall
from pipeline.data.sequences import CONSTRUCTIONS
import os
CACHE = os.environ.get("CACHE", ".cache/issue13")
shards, run = sys.argv[1], sys.argv[2]
pairs, labels, _ = load_pairs(shard_paths(shards, "eval"))
for ck in sorted(p for p in Path(run).glob("checkpoint_2*") if p.is_dir()):
    m = model_from_checkpoint(str(ck))[0].eval()
    d = pair_distances(m, pairs)
    line = f"{ck.name[-15:]} eval4000 {fpr_at_95_recall(d, labels):.4f} first2000 {fpr_at_95_recall(d[:2000], labels[:2000]):.4f}"
    for con in CONSTRUCTIONS:
        z = np.load(f"{CACHE}/graf-{con}.npz")
        line += f" | {con} {fpr_at_95_recall(pair_distances(m, z['p']), z['l']):.3f}"
    print(line, flush=True)
