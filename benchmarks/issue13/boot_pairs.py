"""Bootstrap intervals from evalq.py's cached distances (no model is run): per synthetic eval construction,
model A vs model B (each one's 95 % interval and the paired interval of B - A: the same resampled pairs
for both), and per graf construction, each model vs the best cached baseline there.
usage: boot_pairs.py SYN_KEY RUN_A/CKPT_A RUN_B/CKPT_B   (SYN_KEY: printed by evalq.py; models as evalq's cache
names them: <run folder>-<checkpoint folder>). env CACHE as for evalq.py."""
import json, os, sys
from pathlib import Path
import numpy as np
from pipeline.metrics import fpr_at_95_recall

CACHE = Path(os.environ.get("CACHE", ".cache/issue13"))
BASELINES = ["sift", "opencv_sift", "opencv_vgg", "opencv_boostdesc", "opencv_teblid"]
GRAF = ["dog-oriented", "dog-upright", "harris-upright", "hessian-upright", "hpatches-easy", "hpatches-hard",
        "hpatches-tough"]


def boot(ds: list[np.ndarray], labels: np.ndarray, n: int = 200, seed: int = 0) -> list[tuple[float, float]]:
    """95 % percentile intervals of FPR95 of each distance array and of ds[1] - ds[0], same resamples."""
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n):
        idx = rng.integers(0, len(labels), len(labels))
        if 0 < labels[idx].sum() < len(idx):
            f = [fpr_at_95_recall(d[idx], labels[idx]) for d in ds]
            vals.append(f + [f[1] - f[0]])
    v = np.asarray(vals)
    return [(float(np.percentile(v[:, j], 2.5)), float(np.percentile(v[:, j], 97.5))) for j in range(v.shape[1])]


def row(name: str, ds: list[np.ndarray], labels: np.ndarray, names: list[str]) -> None:
    f = [fpr_at_95_recall(d, labels) for d in ds]
    iv = boot(ds, labels)
    cells = [f"{n} {x:.3f} [{lo:.3f}, {hi:.3f}]" for n, x, (lo, hi) in zip(names, f, iv)]
    print(f"{name:28s} n={len(labels):6d} | " + " | ".join(cells)
          + f" | diff {f[1] - f[0]:+.3f} [{iv[2][0]:+.3f}, {iv[2][1]:+.3f}]", flush=True)


key, a, b = sys.argv[1], sys.argv[2].replace("/", "-"), sys.argv[3].replace("/", "-")
labels = np.load(CACHE / f"syn{key}-labels.npy")
slots = np.load(CACHE / f"syn{key}-slots.npy")
names = json.load(open(CACHE / f"syn{key}-names.json"))
da, db = np.load(CACHE / f"syn{key}-{a}.npy"), np.load(CACHE / f"syn{key}-{b}.npy")
print("synthetic eval split: A =", a, " B =", b)
row("syn-all", [da, db], labels, ["A", "B"])
for i, n in enumerate(names):
    m = slots == i
    row("syn:" + n, [da[m], db[m]], labels[m], ["A", "B"])
print("graf: each model vs the best baseline (lowest FPR95 on that construction)")
for c in GRAF:
    gl = np.load(CACHE / f"graf-{c}.npz")["l"]
    base = {s: np.load(CACHE / f"graf-{c}-{s}.npy") for s in BASELINES if (CACHE / f"graf-{c}-{s}.npy").exists()}
    best = min(base, key=lambda s: fpr_at_95_recall(base[s], gl))
    for label, model in (("A", a), ("B", b)):
        f = CACHE / f"graf-{c}-{model}.npy"
        if f.exists():
            row(f"graf:{c} ({label})", [base[best], np.load(f)], gl, [best, label])
