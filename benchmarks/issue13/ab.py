"""A/B of in-budget runs: FPR95 [95 %] of each checkpoint as saved (its head included) on a shard set's eval
split, and each B paired against its A.  usage: ab.py SHARDS A1 B1 A2 B2 ..."""
import sys
from pathlib import Path
import torch
torch.set_num_threads(2)
from pipeline.checkpoint import model_from_checkpoint
from pipeline.data.shards import shard_paths
from pipeline.data.stream import load_pairs
from pipeline.evaluate import pair_distances
from pipeline.metrics import fpr_at_95_recall, paired_bootstrap_difference

shards, runs = sys.argv[1], sys.argv[2:]
pairs, labels, _ = load_pairs(shard_paths(shards, "eval"))
for a, b in zip(runs[::2], runs[1::2]):
    d = {}
    for r in (a, b):
        ck = sorted(p for p in Path(r).glob("checkpoint_*") if p.is_dir())[-1]
        d[r] = pair_distances(model_from_checkpoint(str(ck))[0], pairs)
    diff, lo, hi = paired_bootstrap_difference(d[b], d[a], labels, fpr_at_95_recall)
    print(f"{Path(shards).name:13s} {Path(a).name} {fpr_at_95_recall(d[a], labels):.4f}  {Path(b).name} "
          f"{fpr_at_95_recall(d[b], labels):.4f}  diff {diff:+.4f} [{lo:+.4f}, {hi:+.4f}]", flush=True)
