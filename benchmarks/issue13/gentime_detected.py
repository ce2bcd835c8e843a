"""CPU cost of one construction on one rendered photograph (8 views): plain vs detected (which detects
in every view too). usage: gentime_detected.py [REF]"""
import sys, time
import numpy as np
from pipeline.data.synthetic import _correspondences, render_sequence
ref = sys.argv[1] if len(sys.argv) > 1 else "skimage:astronaut.png"
rendered = render_sequence(ref, np.random.default_rng(0))
for name in ("dog-oriented", "dog-oriented-detected", "harris-upright", "harris-upright-detected"):
    c = time.process_time(); t = time.perf_counter()
    cor = _correspondences(ref, rendered, 32, name)
    n = int(sum(v.sum() for v in cor.valid.values()))
    print(f"{name:26s} CPU {time.process_time() - c:6.1f} s  wall {time.perf_counter() - t:5.1f} s  "
          f"(point, view) positives {n}", flush=True)
