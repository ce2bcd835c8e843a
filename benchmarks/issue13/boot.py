import os, sys
import numpy as np, torch
CACHE = os.environ.get("CACHE", ".cache/issue13")
torch.set_num_threads(1)
from pipeline.checkpoint import model_from_checkpoint
from pipeline.evaluate import pair_distances
from pipeline.metrics import fpr_at_95_recall, bootstrap_interval
m = model_from_checkpoint(sys.argv[1])[0]
for c in ["hpatches-easy", "hpatches-hard", "harris-upright", "hpatches-tough"]:
    z = np.load(f"{CACHE}/graf-{c}.npz"); p, l = z["p"], z["l"]
    d = pair_distances(m, p)
    best = "opencv_vgg" if c == "harris-upright" else "opencv_sift"
    b = np.load(f"{CACHE}/graf-{c}-{best}.npy")
    for name, x in (("m1", d), (best, b)):
        lo, hi = bootstrap_interval(x, l, fpr_at_95_recall, seed=0)
        print(c, len(l), name, round(fpr_at_95_recall(x, l), 4), round(lo, 4), round(hi, 4), flush=True)
