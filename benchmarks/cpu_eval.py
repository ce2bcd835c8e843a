"""Describing patches on CPU: the inference batch size, side by side, for every architecture.

    .venv/bin/python benchmarks/cpu_eval.py [--patches 4000] [--threads 1 2] [--models hardnet ...]

The same random patches and weights through ``pipeline.evaluate.describe`` (fp32, channels_last
model, as the per-epoch eval runs it) at batch 128 (``plan_for(use_gpu=False).eval_batch_size``)
and 1024 (the GPU plan's). Decides the CPU plan's eval batch: every sweep trial pays one eval per
epoch.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from pipeline.device import plan_for
from pipeline.evaluate import describe
from pipeline.models import create_model, list_models


def seconds(model: torch.nn.Module, patches: np.ndarray, batch: int) -> float:
    describe(model, patches[:256], plan_for(use_gpu=False), batch_size=batch)  # warm-up: oneDNN picks its kernels
    t0 = time.perf_counter()
    describe(model, patches, plan_for(use_gpu=False), batch_size=batch)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patches", type=int, default=4000, help="4000 = the per-epoch eval of 2000 pairs")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--models", nargs="+", default=list_models())
    args = parser.parse_args()
    cpu_batch = plan_for(use_gpu=False).eval_batch_size
    rng = np.random.default_rng(0)
    for arch in args.models:
        torch.manual_seed(0)
        model = create_model(arch).to(memory_format=torch.channels_last)
        size = getattr(model, "input_size", 32)
        patches = rng.integers(0, 256, (args.patches, size, size), dtype=np.uint8)
        for threads in args.threads:
            torch.set_num_threads(threads)
            small, large = seconds(model, patches, cpu_batch), seconds(model, patches, 1024)
            print(f"{arch:9s} {threads} thread(s): batch {cpu_batch} {small:5.2f} s, batch 1024 {large:5.2f} s "
                  f"({large / small:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
