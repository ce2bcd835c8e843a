"""Generate synthetic shard variants for the issue-13 mix experiments: python gen.py m0|m1|m2|md TRAIN_PAIRS -> ./shards-<name>.
md = m1 plus the "detected" constructions (image-k frame = the detector's own re-detection), with its own
eval split: the varied eval mix plus the same detected constructions."""
import sys, time
from pipeline.data.synthetic import generate_synthetic

EVAL_MIX = {"dog-oriented": 1, "dog-upright": 1, "harris-upright": 1, "hessian-upright": 1,
            "dog-oriented-easy": 1, "hessian-oriented-hard": 1, "harris-oriented-tough": 1}
MIXES = {
    "m0": None,
    "m1": {"dog-oriented": 1, "dog-upright": 1, "harris-upright": 1, "hessian-upright": 1,
           "dog-rotated": 1, "harris-oriented-hard": 1, "hessian-oriented-hard": 1},
    "m2": {"dog-oriented": 1, "dog-upright": 1, "harris-upright": 1, "hessian-upright": 1,
           "dog-rotated": 1, "harris-oriented-hard": 1, "hessian-oriented-hard": 1, "hpatches-hard": 1},
}
DETECTED = {"dog-oriented-detected": 1, "harris-upright-detected": 1, "hessian-upright-detected": 1,
            "dog-upright-detected": 1}
MIXES["md"] = {**MIXES["m1"], **DETECTED}
EVAL_MIXES = {"md": {**EVAL_MIX, **DETECTED}}
name, n = sys.argv[1], int(sys.argv[2])
t0, c0 = time.time(), time.process_time()
generate_synthetic(f"shards-{name}", train_pairs=n, eval_pairs=4000, seed=0,
                   train_mix=MIXES[name], eval_mix=EVAL_MIXES.get(name, EVAL_MIX), progress=False)
print(name, "done", time.time() - t0, "wall s", time.process_time() - c0, "CPU s")
