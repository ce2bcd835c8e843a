"""FPR95 of models on the synthetic eval split (per construction) and on graf constructions.
usage: evalq.py SHARDS_DIR MODEL... (MODEL = checkpoint dir or registry name like sift / opencv_vgg)
env GRAF=0 to skip graf. Baseline distances cached in $CACHE (default .cache/issue13)."""
import os, sys, json, hashlib
from pathlib import Path
import numpy as np, torch
torch.set_num_threads(int(os.environ.get("THREADS", "2")))
from pipeline.data.shards import shard_paths
from pipeline.data.stream import load_pairs
from pipeline.evaluate import pair_distances
from pipeline.metrics import fpr_at_95_recall, bootstrap_interval
from pipeline.models import create_model
from pipeline.data.sequences import sequence_pairs, CONSTRUCTIONS

CACHE = Path(os.environ.get("CACHE", ".cache/issue13")); CACHE.mkdir(parents=True, exist_ok=True)
GRAF = Path(__file__).resolve().parents[2] / "data" / "oxford_graf"

def load(spec):
    if Path(spec).is_dir():
        try:
            from pipeline.checkpoint import model_from_checkpoint
        except ImportError:
            from pipeline.train import model_from_checkpoint
        return model_from_checkpoint(spec)[0]
    return create_model(spec).eval()

def tag(spec):
    """Cache name of a model: a registry name, or run/checkpoint_<time> (unique per checkpoint)."""
    return f"{Path(spec).parent.name}-{Path(spec).name}" if Path(spec).is_dir() else spec

def cached_dist(key, spec, pairs):
    f = CACHE / f"{key}-{tag(spec)}.npy"  # checkpoints too, so boot_pairs.py reuses their distances
    if f.exists():
        return np.load(f)
    d = pair_distances(load(spec), pairs); np.save(f, d); return d

shards, specs = sys.argv[1], sys.argv[2:]
rows = {}
pairs, labels, ids = load_pairs(shard_paths(shards, "eval"))
man = json.load(open(Path(shards) / "manifest.json"))
gen = man.get("generator", {})
n_refs = len(gen.get("images", {}).get("eval", [])) or 6
mix = gen.get("eval_mix")
slot = ((ids[:, 0] >> 32) - 1) // n_refs
names = list(mix) if mix else ["dog-oriented"]
skey = hashlib.sha1(pairs[:64].tobytes()).hexdigest()[:8]
cols = ["syn-all"] + [f"syn:{n}" for n in names]
for spec in specs:
    d = cached_dist("syn" + skey, spec, pairs)
    r = rows.setdefault(spec, {})
    r["syn-all"] = fpr_at_95_recall(d, labels)
    for i, n in enumerate(names):
        m = slot == i
        r[f"syn:{n}"] = fpr_at_95_recall(d[m], labels[m])
if os.environ.get("GRAF", "1") != "0":
    for c in CONSTRUCTIONS:
        f = CACHE / f"graf-{c}.npz"
        if f.exists():
            z = np.load(f); gp, gl = z["p"], z["l"]
        else:
            gp, gl, _ = sequence_pairs(GRAF, construction=c, seed=0); np.savez(f, p=gp, l=gl)
        cols.append(f"graf:{c}")
        for spec in specs:
            d = cached_dist("graf-" + c, spec, gp)
            rows[spec][f"graf:{c}"] = fpr_at_95_recall(d, gl)
np.save(CACHE / f"syn{skey}-labels.npy", labels); np.save(CACHE / f"syn{skey}-slots.npy", slot)
json.dump(names, open(CACHE / f"syn{skey}-names.json", "w"))
print("synthetic eval split key:", skey)
print("model".ljust(40), " ".join(c[:14].rjust(14) for c in cols))
for spec, r in rows.items():
    print(Path(spec).name[-40:].ljust(40) if Path(spec).is_dir() else spec.ljust(40), " ".join(f"{r.get(c, float('nan')):14.4f}" for c in cols))
