import time, sys, tempfile
from pipeline.data.synthetic import generate_synthetic, NAMED_MIXES
for rnd in range(1):
    for name, tm, em in (("default", None, None), ("varied", NAMED_MIXES["varied"]["train"], NAMED_MIXES["varied"]["eval"])):
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter(); c0 = time.process_time()
            generate_synthetic(d, train_pairs=20000, eval_pairs=2000, seed=0, train_mix=tm, eval_mix=em, progress=False)
            print(name, f"wall {time.perf_counter()-t0:.1f}s cpu {time.process_time()-c0:.1f}s", flush=True)
